"""`python -m hetcomp.mkl_as_amd`: MKL's AMD dispatch on any x86 CPU, so teachers get the AMD machines' digests."""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hetcomp import mkl_as_amd
from hetcomp.errors import HetCompError

LIBTORCH_CPU = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"


def _mkl_exported() -> bool:
    try:
        return hasattr(ctypes.CDLL(str(LIBTORCH_CPU)), "mkl_serv_cpu_detect")
    except OSError:
        return False


needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="no C compiler (cc or gcc) to build the preload library")
needs_mkl = pytest.mark.skipif(platform.machine() != "x86_64" or not _mkl_exported(),
                               reason="torch here is not an x86-64 build with MKL's dispatcher exported")

def _without_vml_branch() -> dict[str, str]:
    """This process's environment without a VML branch of its own, so that the library's setting holds."""
    return {name: value for name, value in os.environ.items() if name != "MKL_VML_DEBUG_CPU_TYPE"}


#: MKL's dispatch branch (0: the generic one, taken on non-Intel CPUs) and its vector maths' branch, asked after a
#: product and a square root have made MKL dispatch
BRANCH = (f"import ctypes, torch; torch.randn(8, 8) @ torch.randn(8, 8); torch.rand(64).sqrt(); "
          f"mkl = ctypes.CDLL({str(LIBTORCH_CPU)!r}); print(mkl.mkl_serv_cpu_detect(), mkl.mkl_vml_serv_cpu_detect())")


@needs_compiler
@needs_mkl
def test_a_command_run_through_it_gets_mkls_generic_branch_and_says_so_in_its_machine_line(tmp_path):
    env = mkl_as_amd.environment(dict(os.environ, XDG_CACHE_HOME=str(tmp_path)))
    assert env["LD_PRELOAD"].split()[0].startswith(str(tmp_path / "hetcomp"))
    through = subprocess.run([sys.executable, "-m", "hetcomp.mkl_as_amd", sys.executable, "-c",
                              BRANCH + "; from hetcomp.provenance import machine; print(machine())"],
                             env=dict(_without_vml_branch(), XDG_CACHE_HOME=str(tmp_path)), capture_output=True,
                             text=True, check=True)
    branches, line = through.stdout.split("\n")[:2]
    assert branches == "0 0"  # MKL's generic branch and its generic vector maths, as on an AMD CPU
    table = "measured" if mkl_as_amd.rsqrt_runs() else "modelled"  # the package's default source
    assert f"MKL as on AMD (square roots: {table} AMD RSQRTSS)" in line
    plain = subprocess.run([sys.executable, "-c", "from hetcomp.provenance import machine; print(machine())"],
                           capture_output=True, text=True, check=True)
    assert "MKL as on AMD" not in plain.stdout


@needs_compiler
def test_the_library_is_built_once_and_kept_first_in_ld_preload(tmp_path):
    first = mkl_as_amd.library(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert mkl_as_amd.library(tmp_path) == first and first.stat().st_mtime_ns == stamp
    env = mkl_as_amd.environment({"LD_PRELOAD": f"/other.so {first}"}, cache_dir=tmp_path)
    assert env["LD_PRELOAD"] == f"{first} /other.so"


def test_no_compiler_and_an_unknown_command_are_clear_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no library built yet: main must not exec `true`
    with pytest.raises(HetCompError, match="needs a C compiler.*is not a program.*install gcc"):
        mkl_as_amd.library(tmp_path / "cache")
    assert mkl_as_amd.main(["true"]) == 2
    assert "install gcc" in capsys.readouterr().err
    monkeypatch.delenv("CC")
    if shutil.which("cc") or shutil.which("gcc"):
        assert mkl_as_amd.main(["no-such-command-for-hetcomp"]) == 127
        assert "command not found: no-such-command-for-hetcomp" in capsys.readouterr().err
    assert mkl_as_amd.main([]) == 2


#: a hash of torch.sqrt over floats of [1, 4), integers (the autoencoders' row norms) and special values
SQUARE_ROOTS = ("import hashlib, torch; torch.set_num_threads(1); x = torch.cat([torch.rand(1 << 16, "
                "generator=torch.Generator().manual_seed(0)) * 3 + 1, torch.arange(1.0, 5000.0), "
                "torch.tensor([0.0, -1.0, float('inf'), 1e-40, 3e38])]); "
                "print(hashlib.sha256(torch.sqrt(x).numpy().tobytes()).hexdigest())")


@needs_compiler
@needs_mkl
def test_a_rsqrt_table_computes_mkls_generic_square_root_from_its_values(tmp_path):
    """With this CPU's own RSQRTSS table the library's square root is MKL's generic kernel bit for bit, and with
    the table's values moved it is not (so the kernel is replaced, and an AMD machine's table gives that machine's)."""
    starts, values = mkl_as_amd.measure_rsqrt(cache_dir=tmp_path)
    assert len(starts) == len(values) > 100 and starts[0] == 0x3F800000

    def square_roots(code: str, branch: str | None = None) -> str:
        env = mkl_as_amd.environment(_without_vml_branch(), cache_dir=tmp_path, code=code)
        if branch is not None:
            env["MKL_VML_DEBUG_CPU_TYPE"] = branch
        return subprocess.run([sys.executable, "-c", SQUARE_ROOTS], env=env, capture_output=True, text=True,
                              check=True).stdout

    generic = square_roots(mkl_as_amd.source(None), branch="0")  # MKL's own kernel on this CPU's RSQRTSS
    emulated = square_roots(mkl_as_amd.source((starts, values)))  # the library sets branch 0 itself
    assert emulated == generic != square_roots(mkl_as_amd.source((starts, values + np.uint32(1 << 12))))


def test_the_modelled_amd_rsqrt_is_a_12_bit_table_within_the_x86_bound_and_agrees_with_a_zen_datum():
    """The model (the library's table until an AMD machine measures one): one value per bucket of the top 12
    mantissa bits, 13 significant bits, within x86's 1.5·2^-12 of 1/sqrt everywhere, RSQRTSS(1) as a Zen 2 gives
    (its RSQRTSS(256) is 0x3d7ff800), and the runs spell out the rule they were built from."""
    starts, values = mkl_as_amd.modelled_amd_rsqrt()
    assert starts[0] == 0x3F800000 and np.all(np.diff(starts) > 0) and np.all(np.diff(values.astype(np.int64)) <= 0)
    assert np.all(((starts - np.uint32(0x3F800000)) & np.uint32(0x7FF)) == 0)  # runs start on 12-bit buckets
    assert np.all(values & np.uint32(0x7FF) == 0)  # 13 significant bits
    x = np.arange(0x3F800000, 0x40800000, 97, dtype=np.uint32)
    y = values[np.searchsorted(starts, x, side="right") - 1].view(np.float32).astype(np.float64)
    error = np.abs(y * np.sqrt(x.view(np.float32).astype(np.float64)) - 1)
    assert error.max() <= 1.5 * 2.0 ** -12
    assert values[0] == 0x3F7FF800  # 1/sqrt(1) one step below 1: 0x3d7ff800 for 256 = 4^4
    exact = 1 / np.sqrt(np.float64(1.0) + 2.0 ** -13)  # the first bucket's midpoint
    steps = np.round(exact * 2 ** 13 - mkl_as_amd.AMD_RSQRT_MODEL_SHIFT)
    assert values[0] == np.float32(steps / 2 ** 13).view(np.uint32)
    shifted_starts = mkl_as_amd.modelled_amd_rsqrt(shift=0.3)[0]
    assert not np.array_equal(shifted_starts, starts)  # the shift is the model's one free number: it moves the runs


def test_the_models_exceptions_put_their_buckets_on_the_named_candidate_and_leave_every_other_bucket_to_the_rule():
    """The buckets that CiteULike's user autoencoder settled hold the candidate its digest needs (not the rule's);
    no other bucket moves, and a malformed exception is refused with what is wrong."""
    def per_bucket(runs):
        starts, values = runs
        x = np.uint32(0x3F800000) + (np.arange(1 << 13, dtype=np.uint32) << np.uint32(11))
        return values[np.searchsorted(starts, x, side="right") - 1]

    rule = per_bucket(mkl_as_amd.modelled_amd_rsqrt(exceptions={}))
    model = per_bucket(mkl_as_amd.modelled_amd_rsqrt())
    moved = np.flatnonzero(rule != model)
    assert len(moved) == len(mkl_as_amd.AMD_RSQRT_MODEL_EXCEPTIONS) > 0
    for m, side in mkl_as_amd.AMD_RSQRT_MODEL_EXCEPTIONS.items():
        bucket = (int(np.float32(m).view(np.uint32)) - 0x3F800000) >> 11
        assert bucket in moved
        value = np.float64(model[bucket].view(np.float32))
        width = 2.0 ** -12 if m < 2 else 2.0 ** -11
        midpoint = 1 / np.sqrt(np.floor(m / width) * width + width / 2)
        assert (value > midpoint) == (side == "U") and abs(value - midpoint) < 2.0 ** -13  # a 13-bit neighbour
    for bad in ({1.5: "X"}, {4.0: "U"}):
        with pytest.raises(HetCompError, match="m must lie in"):
            mkl_as_amd.modelled_amd_rsqrt(exceptions=bad)


def test_the_default_library_emulates_mkls_square_root_with_the_amd_table(monkeypatch):
    source = mkl_as_amd.default_source()
    assert "rsqrt_values" in source and '"MKL_VML_DEBUG_CPU_TYPE", "0"' in source
    monkeypatch.setattr(mkl_as_amd, "AMD_RSQRT_TABLE", Path("/no/such/table.npz"))
    assert mkl_as_amd.rsqrt_runs() is None


def test_the_machine_line_names_the_table_of_the_preloaded_library(monkeypatch):
    """Read from the library's file name (its source's digest): another table is named as such, not as the model."""
    mkl_as_amd.square_roots.cache_clear()
    named = {}
    for code, label in ((mkl_as_amd.source(None), "MKL's own"),
                        (mkl_as_amd.source(mkl_as_amd.modelled_amd_rsqrt()), "modelled AMD RSQRTSS"),
                        (mkl_as_amd.source(mkl_as_amd.modelled_amd_rsqrt(0.3)), "another RSQRTSS table")):
        name = f"/cache/{mkl_as_amd.LIBRARY_STEM}-{mkl_as_amd._code_digest(code)}.so"
        monkeypatch.setenv("LD_PRELOAD", f"/other.so {name}")
        mkl_as_amd.square_roots.cache_clear()
        named[label] = mkl_as_amd.square_roots()
    monkeypatch.setenv("LD_PRELOAD", "/other.so")
    mkl_as_amd.square_roots.cache_clear()
    assert mkl_as_amd.square_roots() == ""
    mkl_as_amd.square_roots.cache_clear()
    assert named == {label: label for label in named}
