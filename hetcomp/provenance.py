"""Where a result came from: the commit, the source digest, the machine; and how files are named, written and read.

Shared by the run layer (metrics.json) and the paper layer (tables, manifest), so it sits below both.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from hetcomp import mkl_as_amd
from hetcomp.errors import HetCompError


def git_commit(root: Path = Path(__file__).parent) -> str:
    """HEAD's short hash for the repository holding ``root`` (the package), with ``+dirty`` when the sources
    under ``root`` differ from it (uncommitted edits, or a copied tree whose ``.git`` is older than its files), so
    a stamp never names a commit whose code did not run; ``unknown`` outside a repository."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=root).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}+dirty" if changed else head


def source_digest(root: Path = Path(__file__).resolve().parent) -> str:
    """sha256 (12 hex) of the package's Python sources, names included."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


#: the sources this process runs, read once at import: a long ``reproduce`` trains every run with the code it
#: loaded, while ``git_commit()`` reports the HEAD of the moment; runs record both
CODE_DIGEST = source_digest()


def check_sources_unchanged() -> None:
    """Refuse to train once the package's sources on disk differ from those this process started with
    (:data:`CODE_DIGEST`): modules it imports from then on (lazily, or in a long-lived Ray worker) would be the new
    code beside the old, a run made by code no commit holds (seen: a plan of studies whose workers outlived a
    checkout's update failed to import a new name)."""
    now = source_digest()
    if now != CODE_DIGEST:
        raise HetCompError(f"hetcomp's sources changed on disk since this process started (code {CODE_DIGEST} -> "
                           f"{now}): a run now would mix two versions of the code. Rerun the command: finished "
                           "runs and trials are kept and it resumes with the new code (or run long jobs from a "
                           "checkout you do not edit, e.g. a git worktree)")


def machine() -> str:
    """Where numbers were made. The CPU's model and the instruction set torch's kernels use are part of it: the
    same seed on another instruction set (AVX2 against AVX-512) sums in another order, and a teacher trained there
    can rank a few items differently (another digest)."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    # python -m hetcomp.mkl_as_amd: AMD's sgemm bits, and square roots from the table it names
    kernels = f", MKL as on AMD (square roots: {mkl_as_amd.square_roots()})" if mkl_as_amd.active() else ""
    return (f"{platform.system()} {cpu()}{kernels}, {torch.get_num_threads()} threads, {gpu}, "
            f"torch {torch.__version__}")


@functools.cache  # the installed packages do not change within a process
def packages() -> str:
    """The installed versions that make a CPU run's floating-point bits besides the processor, e.g. ``python 3.11.7,
    torch 2.13.0+cpu, MKL 2024.2, numpy 2.4.6, numba 0.68.1, llvmlite 0.50.0, scipy 1.17.1, glibc 2.36``. Where two
    machines' runs differ with the same CPU dispatch (as Foursquare's study did, a Xeon against an EPYC), this line
    says whether a package differs too or only the hardware can. A package that is not installed is left out."""
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    mkl = re.search(r"Math Kernel Library Version ([0-9.]+)", torch.__config__.show())
    parts += [f"MKL {mkl.group(1)}"] if mkl else []
    for name in ("numpy", "numba", "llvmlite", "scipy"):
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    libc, version = platform.libc_ver()
    parts += [f"{libc} {version}"] if libc else []
    return ", ".join(parts)


def cpu() -> str:
    """The processor, its model and torch's CPU kernel level, e.g. ``x86_64 (AMD EPYC, AVX2)``."""
    return f"{platform.processor() or platform.machine()}{_cpu_model()}"


@functools.cache  # the processor does not change within a process
def cpu_vendor_and_model() -> tuple[str, str]:
    """The processor's vendor (``AuthenticAMD``, ``GenuineIntel``) and model name where Linux tells them, else ""."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields.get("vendor_id", ""), fields.get("model name", "")


@functools.cache  # machine() is called for every result
def _cpu_model() -> str:
    """`` (AMD EPYC, AVX2)``: the processor's model name where Linux tells it, and torch's CPU kernel level."""
    model = cpu_vendor_and_model()[1]
    parts = [model] if model else []
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    parts += [capability] if capability else []
    return f" ({', '.join(parts)})" if parts else ""


def dataset_slug(name: str) -> str:
    """A dataset label as a folder name (``csv:toy`` -> ``csv-toy``): the one spelling of every per-dataset path."""
    return name.replace(":", "-")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file and a rename, so a killed process never leaves half a file (the
    temporary name is the process's own: two writers never share one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as handle:
        handle.write(text)
    os.replace(tmp, path)


def read_json(path: Path, what: str, fix: str) -> dict:
    """A JSON file's content, or an error naming the file, what it is and how to fix it."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HetCompError(f"{path}: cannot read this {what} ({error.__class__.__name__}: {error}); {fix}") from None
    if not isinstance(value, dict):
        raise HetCompError(f"{path}: this {what} is not a JSON object; {fix}")
    return value
