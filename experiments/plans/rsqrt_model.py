"""Fit and try models of AMD's RSQRTSS table against the committed autoencoder teachers (no AMD machine needed).

Why: MKL's generic square root is RSQRTPS plus one correction step, and AMD's RSQRTPS differs from Intel's; the
autoencoders' row norms (square roots of integer counts k and 4j) are where it shows. On most inputs the correction
absorbs the table's value; this script finds the inputs where it does not and tries tables on them
(``experiments/results/teachers-foursquare-notes.md``, "A model of AMD's RSQRTSS").

    python experiments/plans/rsqrt_model.py record fs-iae.json -- train-teachers --dataset foursquare \
        --teachers iae --threads 1 --teachers-dir /tmp/rec
        # the distinct inputs of the row-norm sqrt during one training (observation only)
    python experiments/plans/rsqrt_model.py buckets fs-iae.json --pinned fs-ae.json cu-iae.json
        # its buckets where the table's value decides the result (two candidates), with 1/sqrt at the midpoint's
        # place between them; --pinned: records of teachers that already reproduce (their buckets are settled)
    python experiments/plans/rsqrt_model.py run --shift 0.2 [--at 0.5] [--force 2.3203125=L ...] -- \
        hetcomp train-teachers --dataset foursquare --teachers iae --threads 1 --teachers-dir /tmp/try
        # the command through hetcomp.mkl_as_amd's library with that table (Foursquare's teachers also need
        # ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 on an AVX-512 CPU)

A table: constant on each bucket of the top 12 mantissa bits; 1/sqrt at ``lo + at·width`` less ``shift`` steps of
13 significant bits, rounded; ``--force m=L|U`` puts the bucket of m on the candidate below or above.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from rsqrt_table import ex_sqrt  # MKL's generic sqrt kernel lane by lane (this script's folder is on the path)

from hetcomp import mkl_as_amd


def bucket_table(shift: float = mkl_as_amd.AMD_RSQRT_MODEL_SHIFT, at: float = 0.5,
                 force: dict[float, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The table's runs (as :func:`hetcomp.mkl_as_amd.rsqrt_runs`); ``at=0.5`` with ``force`` the model's exceptions
    (:data:`hetcomp.mkl_as_amd.AMD_RSQRT_MODEL_EXCEPTIONS`) is the library's
    :func:`hetcomp.mkl_as_amd.modelled_amd_rsqrt`."""
    starts, values = mkl_as_amd.bucket_rsqrt(shift, at)
    return mkl_as_amd.merged_runs(starts, mkl_as_amd.on_sides(starts, values, force or {}, at))


def reduced(values: list[float]) -> np.ndarray:
    """Positive inputs as their m in [1, 4) (x = m·4^k: the table and the kernel scale exactly)."""
    x = np.asarray([v for v in values if v > 0], dtype=np.float64)
    return np.unique(x / 4.0 ** np.floor(np.log2(x) / 2))


def two_candidate_buckets(ms: np.ndarray) -> list[tuple[float, float]]:
    """(m, where 1/sqrt at the bucket's midpoint lies between the 13-bit values below and above, 0..1) for the
    buckets whose image holds no 13-bit value and whose two candidates give different square roots."""
    found = []
    for m in ms:
        width = 2.0 ** (np.floor(np.log2(m)) - 12)
        low, high = 1 / np.sqrt(m + width), 1 / np.sqrt(m)
        step = 2.0 ** (np.floor(np.log2(high)) - 12)
        below = np.floor(low / step)
        if np.floor(high / step) != below:
            continue  # a 13-bit value inside the image: any rounding of a value in it takes that one
        candidates = (np.array([below, below + 1]) * step).astype(np.float32)
        if len(set(ex_sqrt(np.full(2, m, np.float32), candidates).tolist())) == 2:
            place = 1 / np.sqrt(m + width / 2) / step - below
            found.append((float(m), float(place)))
    return found


def record(out: Path, command: list[str]) -> None:
    import atexit

    import torch

    import hetcomp.models.base as base
    from hetcomp.cli import app

    seen: set[float] = set()
    inside = [False]
    plain_sqrt, plain_encode = torch.Tensor.sqrt, base.CSRRows.encode

    def sqrt(self, *args, **kwargs):
        if inside[0]:
            seen.update(torch.unique(self.detach()).tolist())
        return plain_sqrt(self, *args, **kwargs)

    def encode(self, *args, **kwargs):
        inside[0] = True
        try:
            return plain_encode(self, *args, **kwargs)
        finally:
            inside[0] = False

    torch.Tensor.sqrt, base.CSRRows.encode = sqrt, encode
    atexit.register(lambda: out.write_text(json.dumps(sorted(seen))))
    sys.argv = ["hetcomp", *command]
    app()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    recording = verbs.add_parser("record")
    recording.add_argument("out", type=Path)
    recording.add_argument("command", nargs=argparse.REMAINDER)
    listing = verbs.add_parser("buckets")
    listing.add_argument("record", type=Path)
    listing.add_argument("--pinned", type=Path, nargs="*", default=[])
    running = verbs.add_parser("run")
    running.add_argument("--shift", type=float, default=mkl_as_amd.AMD_RSQRT_MODEL_SHIFT)
    running.add_argument("--at", type=float, default=0.5)
    running.add_argument("--force", nargs="*", default=[], help="m=L or m=U")
    running.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = [word for word in getattr(args, "command", []) if word != "--"]
    if args.verb == "record":
        record(args.out, command)
    elif args.verb == "buckets":
        pinned = set()
        for path in args.pinned:
            pinned |= {m for m, _ in two_candidate_buckets(reduced(json.loads(path.read_text())))}
        for m, place in two_candidate_buckets(reduced(json.loads(args.record.read_text()))):
            print(f"m={m:.8f}  midpoint at {place:.3f} of the step  {'settled' if m in pinned else 'open'}")
    else:
        force = {float(m): side for m, side in (item.split("=") for item in args.force)}
        code = mkl_as_amd.source(bucket_table(args.shift, args.at, force))
        env = mkl_as_amd.environment(code=code)
        executable = shutil.which(command[0], path=env.get("PATH")) if command else None
        if executable is None:
            parser.error(f"command not found: {command[0] if command else '(none given after --)'}")
        os.execve(executable, command, env)


if __name__ == "__main__":
    main()
