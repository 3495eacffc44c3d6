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
check: with the vendor checks answered, they take their branch 0 (`EX`), as an AMD CPU does. Its square root is
RSQRTPS, the hardware's approximate 1/sqrt, refined by one correction step; x86 defines RSQRTPS (and RCPPS) only
to 1.5·2^-12, and AMD's and Intel's results differ (an AMD Zen 3 emulated down to its CPUID answers,
``experiments/plans/cpuid_as_amd.c``, gave the library's digests, not the AMD machine's): so the autoencoders'
row norms round otherwise. The library sets branch 0 (unless ``MKL_VML_DEBUG_CPU_TYPE`` is set) and replaces MKL's
`EX` square root by the same steps on an AMD RSQRTSS table: a machine's measured one where the package has it
(``AMD_RSQRT_TABLE``, from ``experiments/plans/rsqrt_table.py --package`` on an AMD CPU), else a model of one
(:func:`modelled_amd_rsqrt`). With the model, every committed teacher of Foursquare and CiteULike gets its digest
on an Intel Xeon (``experiments/results/teachers-foursquare-notes.md``, ``teachers-citeulike-notes.md``). The
emulation is tested against MKL's own kernel with this CPU's table (bit for bit).

    python -m hetcomp.mkl_as_amd hetcomp train-teachers --dataset citeulike

compiles that library once (with the machine's C compiler, into ``~/.cache/hetcomp``) and runs the command with it.
Slower than the native AVX-512 kernels where a run's time is in dense products, which is what an AMD machine
pays too. Runs record it in their machine line (:func:`hetcomp.provenance.machine`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hetcomp.errors import HetCompError

#: an AMD machine's RSQRTSS over [1, 4) as runs (``experiments/plans/rsqrt_table.py`` measures one), where present;
#: without it the library uses :func:`modelled_amd_rsqrt`
AMD_RSQRT_TABLE = Path(__file__).with_name("rsqrt_amd.npz")
#: how far below 1/sqrt at a bucket's midpoint :func:`modelled_amd_rsqrt` rounds, in steps of its 13-bit results:
#: the middle of the interval (0.05, 0.17) where the model gives every committed Foursquare teacher its digest
AMD_RSQRT_MODEL_SHIFT = 0.11
#: buckets (by an input m in [1, 4) of each) whose value the rule above gets wrong, with the 13-bit candidate that
#: AMD's table holds there ("U": the one above 1/sqrt at the midpoint, "L": below): CiteULike's user autoencoder
#: meets six buckets that no other committed teacher settles; of their 64 choices, the one with these two
#: exceptions gives its committed digest (``experiments/plans/rsqrt_tree.py``; ``teachers-citeulike-notes.md``)
AMD_RSQRT_MODEL_EXCEPTIONS = {1.55859375: "U", 2.42578125: "U"}


def modelled_amd_rsqrt(shift: float = AMD_RSQRT_MODEL_SHIFT,
                       exceptions: dict[float, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A model of AMD's RSQRTSS over [1, 4), as the runs of :func:`rsqrt_runs`: constant on each bucket of the
    input's top 12 mantissa bits (and its exponent's parity), 1/sqrt at the bucket's midpoint lowered by ``shift``
    steps and rounded to 13 significant bits.

    Why a model: no AMD machine has measured its table yet, and the autoencoder teachers' row norms (square roots
    of integer counts) need AMD's values where MKL's correction step does not absorb the difference. Its shape
    follows public observations of Zen CPUs (AMD's results differ from Intel's only through the input's top 21
    bits, i.e. 12 mantissa bits; RSQRTSS(256) is 0x3d7ff800 on a Rome, 13 significant bits), and its one free
    number was chosen by the committed teachers' digests: with it Foursquare's user and item autoencoders
    reproduce bit for bit on an Intel CPU, where the same correction on 1/sqrt cut to 13 bits (MKL's `E2`
    branch) and plain rounding at the midpoint do not (``experiments/results/teachers-foursquare-notes.md``).
    Where a committed teacher's digest showed the rule wrong, the bucket takes the value that digest needs
    (``exceptions``, default :data:`AMD_RSQRT_MODEL_EXCEPTIONS`). It is not claimed to equal the hardware on every
    input.
    """
    starts, values = bucket_rsqrt(shift)
    return merged_runs(starts, on_sides(starts, values, AMD_RSQRT_MODEL_EXCEPTIONS if exceptions is None
                                        else exceptions))


def bucket_of(starts: np.ndarray, m: float) -> int:
    """The index of the bucket (of :func:`bucket_rsqrt`'s ``starts``) that holds the float ``m`` in [1, 4)."""
    return int(np.searchsorted(starts, np.float32(m).view(np.uint32), side="right")) - 1


def candidates(at: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per bucket, the 13-bit values just below ("L") and just above ("U") 1/sqrt at ``lo + at·width``: the two a
    table can hold where MKL's correction step does not absorb the difference."""
    below = bucket_rsqrt(0.5, at)[1]  # rounded half a step lower: the 13-bit value below
    return below, below + np.uint32(1 << 11)


def on_sides(starts: np.ndarray, values: np.ndarray, sides: dict[float, str], at: float = 0.5) -> np.ndarray:
    """``values`` with the bucket of each m in ``sides`` on its named candidate (:func:`candidates`), in place."""
    lower, upper = candidates(at)
    for m, side in sides.items():
        if side not in ("L", "U") or not 1 <= m < 4:
            raise HetCompError(f"RSQRTSS bucket {m}={side}: m must lie in [1, 4) and the side be L or U")
        bucket = bucket_of(starts, m)
        values[bucket] = (lower if side == "L" else upper)[bucket]
    return values


def bucket_rsqrt(shift: float, at: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per bucket of the top 12 mantissa bits over [1, 4) (8,192 of them): its first float's bits, and 1/sqrt at
    ``lo + at·width`` lowered by ``shift`` steps of 13 significant bits and rounded (:func:`modelled_amd_rsqrt`'s
    rule; ``experiments/plans/rsqrt_model.py`` tries others)."""
    bucket = np.arange(1 << 13, dtype=np.uint32)  # 4,096 buckets over [1, 2), then 4,096 over [2, 4)
    starts = np.uint32(0x3F800000) + (bucket << np.uint32(11))
    width = np.where(bucket < (1 << 12), 2.0 ** -12, 2.0 ** -11)
    exact = 1 / np.sqrt(starts.view(np.float32).astype(np.float64) + at * width)
    step = 2.0 ** (np.floor(np.log2(exact)) - 12)
    return starts, (np.round(exact / step - shift) * step).astype(np.float32).view(np.uint32)


def merged_runs(starts: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive equal ``values`` as one run (the form of :func:`rsqrt_runs`): each run's first start and value."""
    first = np.concatenate([[True], np.diff(values) != 0])
    return starts[first], values[first]


#: MKL's vendor checks, answered as on an AMD Zen CPU: not Intel's (its generic branch), and Zen (that branch's Zen
#: sgemm kernels; without it MKL takes the plain SSE2 kernels, which no AMD machine of ours ran); and, set when the
#: library loads (before MKL reads it at its first vector function), the vector maths' branch
VENDOR_CHECKS = """\
#include <stdlib.h>
int mkl_serv_intel_cpu_true(void) { return 0; }
int mkl_serv_intel_cpu(void) { return 0; }
int mkl_serv_cpuiszen(void) { return 1; }
__attribute__((constructor)) static void vml_as_on_amd(void) { setenv("MKL_VML_DEBUG_CPU_TYPE", "BRANCH", 0); }
"""
#: MKL's generic (EX) square root, y = RSQRTSS(x) and one correction step, with y from a measured table instead of
#: this CPU's RSQRTSS (whose results differ between AMD and Intel CPUs): it replaces MKL's kernel of that name (the
#: library is preloaded) for inputs from 2^-100 (no intermediate is subnormal) to MKL's own upper limit of its main
#: path; zeros, negatives, tiny, huge and non-finite inputs go to MKL's kernel
EMULATED_SQRT = """\
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <string.h>
STARTS
VALUES
static float table_rsqrt(float x) {  /* x = m 4^k, m in [1, 4): the table's result for m, times 2^-k */
    uint32_t b, y;
    memcpy(&b, &x, 4);
    int k = (((int)(b >> 23)) - 127) >> 1, lo = 0, hi = RUNS - 1;
    uint32_t m = b - ((uint32_t)(2 * k) << 23);
    while (lo < hi) { int mid = (lo + hi + 1) >> 1; if (rsqrt_starts[mid] <= m) lo = mid; else hi = mid - 1; }
    y = rsqrt_values[lo] - ((uint32_t)k << 23);
    float r;
    memcpy(&r, &y, 4);
    return r;
}
static float ex_lane(float x, float y) {
    float s = x * y, h = y * 0.5f;
    float r = 0.5f - s * h;
    float s1 = s * r + s, h1 = r * h + h;
    return (x - s1 * s1) * h1 + s1;
}
typedef void (*kernel)(int, const float *, float *);
void mkl_vml_kernel_sSqrt_EXHAynn(int n, const float *a, float *r) {
    static kernel mkl;
    if (!mkl) mkl = (kernel)dlsym(dlopen("libtorch_cpu.so", RTLD_NOW | RTLD_NOLOAD), "mkl_vml_kernel_sSqrt_EXHAynn");
    for (int i = 0; i < n; i++) {
        uint32_t b;
        memcpy(&b, &a[i], 4);
        if (b >= 0x0d800000u && b <= 0x7f7ff000u) r[i] = ex_lane(a[i], table_rsqrt(a[i]));
        else mkl(1, &a[i], &r[i]);
    }
}
"""
#: this CPU's RSQRTSS, for :func:`measure_rsqrt`
RSQRT_PROBE = """\
#include <immintrin.h>
void rsqrt_hw(const float *x, float *out, long n) {
    for (long i = 0; i < n; i++) out[i] = _mm_cvtss_f32(_mm_rsqrt_ss(_mm_set_ss(x[i])));
}
"""


def rsqrt_runs(table: Path | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """A RSQRTSS table's run starts and values (float bits in [1, 4)), from ``table`` (default: the AMD one, when
    the package has it)."""
    table = AMD_RSQRT_TABLE if table is None else Path(table)
    if not table.is_file():
        return None
    with np.load(table) as runs:
        return runs["starts"].astype(np.uint32), runs["values"].astype(np.uint32)


def source(rsqrt: tuple[np.ndarray, np.ndarray] | None) -> str:
    """The library's C source: the vendor checks and VML branch 0 (MKL's generic kernels, as on an AMD CPU), and,
    given a RSQRTSS table, MKL's generic square root computed from that table."""
    if rsqrt is None:
        return VENDOR_CHECKS.replace("BRANCH", "0")
    starts, values = rsqrt

    def array(name: str, items: np.ndarray) -> str:
        return f"static const uint32_t {name}[{len(items)}] = {{{','.join(f'{int(v):#010x}u' for v in items)}}};"
    return (EMULATED_SQRT.replace("STARTS", array("rsqrt_starts", starts))
            .replace("VALUES", array("rsqrt_values", values)).replace("RUNS", str(len(starts)))
            + VENDOR_CHECKS.replace("BRANCH", "0"))


@functools.cache
def default_source() -> str:
    """The library's source by default: with an AMD machine's measured RSQRTSS table where the package has one, else
    with the model of one (built on first use, not at import: every hetcomp command imports this module)."""
    return source(rsqrt_runs() or modelled_amd_rsqrt())
#: the library's file name starts with this, so a process can tell that it runs with it
LIBRARY_STEM = "hetcomp-mkl-as-amd"


def default_cache_dir(env: dict[str, str] | os._Environ) -> Path:
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hetcomp"


def library(cache_dir: Path | None = None, env: dict[str, str] | os._Environ | None = None,
            code: str | None = None) -> Path:
    """The preload library of ``code`` (default: :func:`default_source`), compiled on first use (one file per source
    version, written atomically); ``env`` (default: this process's environment) gives the cache folder where
    ``cache_dir`` does not, and ``CC``."""
    env = os.environ if env is None else env
    return _compile(code or default_source(), cache_dir or default_cache_dir(env), env, LIBRARY_STEM,
                    ["-shared", "-fPIC", "-ldl"])


def _code_digest(code: str) -> str:
    """The digest that names a library built from ``code``."""
    return hashlib.sha256(code.encode()).hexdigest()[:12]


def _compile(code: str, cache_dir: Path, env: dict[str, str] | os._Environ, stem: str, flags: list[str]) -> Path:
    path = cache_dir / f"{stem}-{_code_digest(code)}.so"
    if path.exists():
        return path
    named = env.get("CC")
    compiler = shutil.which(named) if named else shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise HetCompError(f"hetcomp.mkl_as_amd needs a C compiler to build its small preload library: "
                           f"{f'CC={named} is not a program' if named else 'no cc or gcc found'}; install gcc "
                           "(or set CC to one)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    written = cache_dir / f"{path.stem}.c"
    written.write_text(code)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    # float operations as written (no fused multiply-adds): the emulated square root must round as MKL's kernel does
    done = subprocess.run([compiler, "-O2", "-ffp-contract=off", "-o", str(partial), str(written), *flags],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise HetCompError(f"{compiler} could not build {path.name}: {done.stderr.strip()}")
    partial.replace(path)
    return path


def environment(base: dict[str, str] | None = None, cache_dir: Path | None = None, code: str | None = None
                ) -> dict[str, str]:
    """``base`` (default: this process's environment) with the library (of ``code``) first in ``LD_PRELOAD``."""
    env = dict(os.environ if base is None else base)
    preload = [str(library(cache_dir, env, code)), *env.get("LD_PRELOAD", "").split()]
    env["LD_PRELOAD"] = " ".join(dict.fromkeys(preload))
    return env


def hardware_rsqrt(cache_dir: Path | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """This CPU's RSQRTSS as a function of float32 arrays (a small compiled probe)."""
    import ctypes

    probe = ctypes.CDLL(str(_compile(RSQRT_PROBE, cache_dir or default_cache_dir(os.environ), os.environ,
                                     "hetcomp-rsqrt-probe", ["-shared", "-fPIC", "-msse2"])))

    def rsqrt(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.empty_like(x)
        probe.rsqrt_hw(x.ctypes.data_as(ctypes.c_void_p), y.ctypes.data_as(ctypes.c_void_p), ctypes.c_long(len(x)))
        return y
    return rsqrt


def measure_rsqrt(rsqrt: Callable[[np.ndarray], np.ndarray] | None = None, cache_dir: Path | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """This CPU's RSQRTSS (``rsqrt``, default :func:`hardware_rsqrt`) over every float in [1, 4), as the run starts
    and values of :func:`rsqrt_runs` (the instruction's result for x 4^k is that for x times 2^-k on the CPUs
    measured: ``rsqrt_table.py`` checks it)."""
    rsqrt = rsqrt or hardware_rsqrt(cache_dir)
    every = np.arange(0x3F800000, 0x40800000, dtype=np.uint32)
    return merged_runs(every, rsqrt(every.view(np.float32)).view(np.uint32))


def active() -> bool:
    """Whether this process was started with the library preloaded."""
    return LIBRARY_STEM in os.environ.get("LD_PRELOAD", "")


@functools.cache  # the preloaded library does not change within a process
def square_roots() -> str:
    """Where the preloaded library's square roots come from, by the digest in its file name: ``"measured AMD
    RSQRTSS"`` (the package's table), ``"modelled AMD RSQRTSS"`` (:func:`modelled_amd_rsqrt`), ``"MKL's own"``
    (a library without a table), ``"another RSQRTSS table"`` (e.g. one that ``rsqrt_model.py`` tried), or ``""``
    without the library. A run's machine line says it, since the autoencoders' digests depend on it."""
    names = [Path(entry).name for entry in os.environ.get("LD_PRELOAD", "").split() if LIBRARY_STEM in entry]
    if not names:
        return ""
    measured = rsqrt_runs()
    known = {_code_digest(source(None)): "MKL's own",
             _code_digest(source(modelled_amd_rsqrt())): "modelled AMD RSQRTSS"}
    if measured is not None:
        known[_code_digest(source(measured))] = "measured AMD RSQRTSS"
    digest = names[0].removeprefix(f"{LIBRARY_STEM}-").removesuffix(".so")
    return known.get(digest, "another RSQRTSS table")


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
