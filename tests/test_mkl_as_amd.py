"""`python -m hetcomp.mkl_as_amd`: MKL's AMD dispatch on any x86 CPU, so teachers get the AMD machines' digests."""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

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

#: MKL's dispatch branch (0: the generic one, taken on non-Intel CPUs) and its vector maths' branch, asked after a
#: product and a square root have made MKL dispatch
BRANCH = (f"import ctypes, torch; torch.randn(8, 8) @ torch.randn(8, 8); torch.rand(64).sqrt(); "
          f"mkl = ctypes.CDLL({str(LIBTORCH_CPU)!r}); print(mkl.mkl_serv_cpu_detect(), mkl.mkl_vml_serv_cpu_detect())")


@needs_compiler
@needs_mkl
def test_a_command_run_through_it_gets_mkls_generic_branch_and_says_so_in_its_machine_line(tmp_path):
    env = mkl_as_amd.environment(dict(os.environ, XDG_CACHE_HOME=str(tmp_path)))
    assert env["LD_PRELOAD"].split()[0].startswith(str(tmp_path / "hetcomp"))
    unset = {name: value for name, value in os.environ.items() if name != "MKL_VML_DEBUG_CPU_TYPE"}
    through = subprocess.run([sys.executable, "-m", "hetcomp.mkl_as_amd", sys.executable, "-c",
                              BRANCH + "; from hetcomp.provenance import machine; print(machine())"],
                             env=dict(unset, XDG_CACHE_HOME=str(tmp_path)), capture_output=True, text=True,
                             check=True)
    branches, line = through.stdout.split("\n")[:2]
    assert branches == f"0 {mkl_as_amd.VML_BRANCH}"
    assert "MKL as on AMD" in line
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
