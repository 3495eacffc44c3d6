"""Run a command with the matrix kernels MKL picks on an AMD CPU, on an Intel one, so that products made on either
are the same bits.

Why: torch's CPU build links Intel's MKL, which chooses its sgemm kernels by the CPU's vendor. On a non-Intel CPU
it takes its generic branch (``mkl_serv_cpu_detect() == 0``, Zen kernels on AMD), on an Intel CPU the branch of
its widest instruction set; the sums come out in another order, and a teacher whose model multiplies dense
matrices (NeuMF, LightGCN, the autoencoders) ranks a few items differently: another digest, and the committed
studies and rows made with the AMD machines' teachers cannot be continued. MKL's own switches give other kernels
again, not the generic branch: ``MKL_CBWR=AVX2`` and ``MKL_CBWR=COMPATIBLE`` moved the CiteULike NeuMF teacher's
digest elsewhere (2026-12-06). MKL asks exported functions whether the CPU is Intel's and whether it is a Zen; a
tiny library preloaded before torch answers no and yes (``LD_PRELOAD``), and MKL dispatches as on an AMD Zen CPU.
With it, CiteULike's NeuMF and LightGCN teachers and Foursquare's NeuMF got the committed digests on an Intel
Xeon. MKL's vector maths (VML: torch's sqrt, tanh, exp and log go through them) choose their kernels by another
check: with the vendor checks answered, they take their branch 0, whose sqrt rounds otherwise than branch 1, which
matches the AMD machine of Foursquare's teachers: its user autoencoder (torch and MKL held at AVX2) got its committed
digest with ``MKL_VML_DEBUG_CPU_TYPE=1`` and not with 0 or 3 (2026-12-06). The library sets that variable as it
loads (unless it is set), so whatever runs with it has both. Not reproduced yet on an Intel CPU, with any branch
tried: both item autoencoders and CiteULike's user autoencoder (``experiments/results/teachers-foursquare-notes.md``).

    python -m hetcomp.mkl_as_amd hetcomp train-teachers --dataset citeulike

compiles that library once (with the machine's C compiler, into ``~/.cache/hetcomp``) and runs the command with it.
Slower than the native AVX-512 kernels where a run's time is in dense products, which is what an AMD machine
pays too. Runs record it in their machine line (:func:`hetcomp.provenance.machine`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from hetcomp.errors import HetCompError

#: the branch of MKL's vector maths (its E2 kernels) that Foursquare's AMD machine took, found by training (see
#: the module's docstring)
VML_BRANCH = "1"
#: MKL's vendor checks, answered as on an AMD Zen CPU: not Intel's (its generic branch), and Zen (that branch's Zen
#: sgemm kernels; without it MKL takes the plain SSE2 kernels, which no AMD machine of ours ran); and, set when the
#: library loads (before MKL reads it at its first vector function), the vector maths' branch
SOURCE = f"""\
#include <stdlib.h>
int mkl_serv_intel_cpu_true(void) {{ return 0; }}
int mkl_serv_intel_cpu(void) {{ return 0; }}
int mkl_serv_cpuiszen(void) {{ return 1; }}
__attribute__((constructor)) static void vml_as_on_amd(void) {{ setenv("MKL_VML_DEBUG_CPU_TYPE", "{VML_BRANCH}", 0); }}
"""
#: the library's file name starts with this, so a process can tell that it runs with it
LIBRARY_STEM = "hetcomp-mkl-as-amd"


def default_cache_dir(env: dict[str, str] | os._Environ) -> Path:
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hetcomp"


def library(cache_dir: Path | None = None, env: dict[str, str] | os._Environ | None = None) -> Path:
    """The preload library, compiled on first use (one file per source version, written atomically); ``env``
    (default: this process's environment) gives the cache folder where ``cache_dir`` does not, and ``CC``."""
    env = os.environ if env is None else env
    cache_dir = cache_dir or default_cache_dir(env)
    path = cache_dir / f"{LIBRARY_STEM}-{hashlib.sha256(SOURCE.encode()).hexdigest()[:12]}.so"
    if path.exists():
        return path
    named = env.get("CC")
    compiler = shutil.which(named) if named else shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise HetCompError(f"hetcomp.mkl_as_amd needs a C compiler to build its small preload library: "
                           f"{f'CC={named} is not a program' if named else 'no cc or gcc found'}; install gcc "
                           "(or set CC to one)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    source = cache_dir / f"{path.stem}.c"
    source.write_text(SOURCE)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(partial), str(source)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise HetCompError(f"{compiler} could not build {path.name}: {done.stderr.strip()}")
    partial.replace(path)
    return path


def environment(base: dict[str, str] | None = None, cache_dir: Path | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the library first in ``LD_PRELOAD``."""
    env = dict(os.environ if base is None else base)
    preload = [str(library(cache_dir, env)), *env.get("LD_PRELOAD", "").split()]
    env["LD_PRELOAD"] = " ".join(dict.fromkeys(preload))
    return env


def active() -> bool:
    """Whether this process was started with the library preloaded."""
    return LIBRARY_STEM in os.environ.get("LD_PRELOAD", "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n\nusage: python -m hetcomp.mkl_as_amd COMMAND [ARGS...]")
        return 0 if argv else 2
    try:
        env = environment()
    except HetCompError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    executable = shutil.which(argv[0], path=env.get("PATH"))
    if executable is None:
        print(f"error: command not found: {argv[0]}", file=sys.stderr)
        return 127
    os.execve(executable, argv, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
