"""This CPU's RSQRTSS, the hardware's approximate 1/sqrt, over every float in [1, 4), stored as its runs.

Why: MKL's generic sqrt kernel (VML branch 0, `EX`: what torch.sqrt runs on an AMD CPU) is y = RSQRTPS(x) refined by
one correction step in exactly rounded float operations (`hetcomp.mkl_as_amd.EMULATED_SQRT`, read from
`mkl_vml_kernel_sSqrt_EXHAynn`; checked here against torch.sqrt on all 2^24 floats of [1, 4)). RSQRTPS is the one
instruction whose results the x86 vendors define only to 1.5·2^-12, and AMD's and Intel's differ; so the
autoencoder teachers' row norms (`CSRRows.encode`'s sqrt) round otherwise on each, which no dispatch setting can
change. An AMD machine's table, in the package (`--package`), lets `python -m hetcomp.mkl_as_amd` compute that
machine's square roots on an Intel CPU: the approximation is exponent-separable (checked below), so [1, 4) covers
every positive normal float.

Usage: python experiments/plans/rsqrt_table.py [--out experiments/results/rsqrt] [--package]
writes <out>/<vendor>-<cpu model>.npz (the float bits where each run of equal results begins, and its result) and,
with --package on an AMD CPU, hetcomp/rsqrt_amd.npz; prints the runs, the separability check and the kernel check.
Needs a C compiler.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from hetcomp import mkl_as_amd
from hetcomp.provenance import cpu_vendor_and_model


def ex_sqrt(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """MKL's EX sqrt kernel, lane by lane (float32, each operation rounded, no fused multiply-add)."""
    half = np.float32(0.5)
    s, h = x * y, y * half
    r = half - s * h
    s1, h1 = s * r + s, r * h + h
    return (x - s1 * s1) * h1 + s1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("experiments/results/rsqrt"))
    parser.add_argument("--package", action="store_true", help="also write hetcomp/rsqrt_amd.npz (an AMD CPU only)")
    args = parser.parse_args()
    vendor, model = (part or "unknown" for part in cpu_vendor_and_model())
    if args.package and vendor != "AuthenticAMD":
        raise SystemExit(f"--package writes the AMD table, and this CPU is {vendor} {model}")
    rsqrt = mkl_as_amd.hardware_rsqrt()
    starts, values = mkl_as_amd.measure_rsqrt(rsqrt)
    x = np.arange(0x3F800000, 0x40800000, dtype=np.uint32).view(np.float32)  # every float in [1, 4)
    y = np.repeat(values, np.diff(np.append(starts, 0x40800000))).view(np.float32)
    assert np.array_equal(y, rsqrt(x)), "the runs do not give the instruction's results back"
    sample = (np.random.default_rng(0).random(1 << 16, dtype=np.float32) * 3 + 1).astype(np.float32)
    sample_y = rsqrt(sample)
    violations = sum(int((rsqrt(sample * np.float32(4.0) ** k) != sample_y * np.float32(2.0) ** -k).sum())
                     for k in range(-30, 31) if k)
    torch.set_num_threads(1)
    same = int((ex_sqrt(x, y) == torch.sqrt(torch.from_numpy(x)).numpy()).sum())
    branch = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")).mkl_vml_serv_cpu_detect()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{re.sub(r'[^A-Za-z0-9]+', '-', f'{vendor} {model}').strip('-')}.npz"
    np.savez_compressed(path, starts=starts, values=values, cpu=f"{vendor} {model}")
    if args.package:
        shutil.copyfile(path, mkl_as_amd.AMD_RSQRT_TABLE)
    print(f"{vendor} {model}: RSQRTSS over [1, 4) in {len(starts)} runs, digest "
          f"{hashlib.sha256(y.tobytes()).hexdigest()[:12]} -> {path}"
          + (f" and {mkl_as_amd.AMD_RSQRT_TABLE}" if args.package else ""))
    print(f"exponent separability (x·4^k, k = ±1..30, 2^16 samples): {violations} violations")
    print(f"torch.sqrt (MKL VML branch {branch}) equals the EX kernel on this RSQRTSS for {same} of {len(x)} "
          "floats in [1, 4)" + (" (branch 0 is the EX kernel)" if branch != 0 else ""))
    # the autoencoders' row norms are square roots of integer counts k and, under dropout 1/2, of 4k; branch 1 (E2)
    # gave one AMD machine's digest for Foursquare's user autoencoder (counts up to 267): where does it agree?
    counts = np.arange(1, 5001, dtype=np.float32)
    counts = np.concatenate([counts, 4 * counts])
    ex = ex_sqrt(counts, rsqrt(counts))
    e2 = np.frombuffer(bytes.fromhex(subprocess.run(
        [sys.executable, "-c", "import sys, numpy as np, torch; torch.set_num_threads(1); "
         "print(torch.sqrt(torch.from_numpy(np.frombuffer(bytes.fromhex(sys.stdin.read()), np.float32).copy()))"
         ".numpy().tobytes().hex())"], input=counts.tobytes().hex(), capture_output=True, text=True, check=True,
        env={**os.environ, "MKL_VML_DEBUG_CPU_TYPE": "1"}).stdout.strip()), np.float32)
    differ = np.flatnonzero(ex != e2)
    print(f"integers k <= 5000 and 4k: branch 1 (E2) equals the EX kernel on this RSQRTSS for "
          f"{len(counts) - len(differ)} of {len(counts)}; first differences at {counts[differ[:8]].tolist()}")


if __name__ == "__main__":
    main()
