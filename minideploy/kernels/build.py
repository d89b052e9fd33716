"""Just-in-time build and loading of the C++/CUDA kernels.

An extension is named by its source stem and a device: `load("norm_rope", "cpu")`
compiles `minideploy/csrc/cpu/norm_rope.cpp`, `load("norm_rope", "cuda")`
compiles `minideploy/csrc/cuda/norm_rope.cu`, with
`torch.utils.cpp_extension.load` (ninja). Each build lives in its own directory

    $MINIDEPLOY_CACHE/kernels/<module name>   ($MINIDEPLOY_CACHE defaults to
                                              ~/.cache/minideploy, or $XDG_CACHE_HOME/minideploy)

where the module name carries a key: a hash of the source files (and headers
beside them), the compiler flags, torch, CUDA and Python versions, and the
target (the GPU's sm_XY, or the host CPU's instruction set, since the CPU build
uses -march=native). A changed source or another GPU gets a new directory and
a new module name, so two variants never collide, in one process or on disk.

A build killed half-way leaves torch's `lock` file behind, and torch would then
wait for it forever. Builders here first take an OS lock (`flock`, released by
the kernel when a process dies) on `<dir>.flock`; whoever holds it knows that
a `lock` left in the directory is stale, says so in the log and removes it.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCE_SUFFIX = {"cpu": ".cpp", "cuda": ".cu"}
HEADER_SUFFIXES = (".h", ".hpp", ".cuh")

CPU_CFLAGS = ("-O3", "-fopenmp", "-march=native", "-ffp-contract=off")
CPU_LDFLAGS = ("-fopenmp",)
# No --use_fast_math: the norms must round like the reference.
CUDA_CFLAGS = ("-O3",)
CUDA_HOST_CFLAGS = ("-O3",)

# Where fcntl is missing (Windows), a torch `lock` older than this is stale.
STALE_LOCK_SECONDS = 15 * 60
MAX_ERROR_CHARS = 2000  # of a compiler log quoted in an error or warning

_build_lock = threading.Lock()  # one build at a time inside a process


class KernelBuildError(RuntimeError):
    """An extension could not be compiled or imported."""


def cache_root() -> Path:
    base = os.environ.get("MINIDEPLOY_CACHE")
    root = Path(base) if base else Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "minideploy"
    return root.expanduser() / "kernels"


@functools.cache
def cuda_arch(index: int) -> str:
    """The target name of GPU `index`: "sm_90" for compute capability 9.0."""
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def _host_cpu() -> str:
    """The host's instruction set, so a -march=native build is never loaded on another CPU."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return hashlib.sha256(line.encode()).hexdigest()[:16]
    except OSError:
        pass
    return platform.processor() or "unknown"


def _sources(name: str, device_type: str) -> list[Path]:
    if device_type not in SOURCE_SUFFIX:
        raise KernelBuildError(f"no kernels for device type {device_type!r}")
    source = CSRC / device_type / f"{name}{SOURCE_SUFFIX[device_type]}"
    if not source.is_file():
        raise KernelBuildError(f"kernel source {source} does not exist")
    return [source]


@functools.cache
def _runtime_libstdcxx() -> tuple[str, ...]:
    """The shared libstdc++ this process runs with (torch loaded it), as a link input.

    Seen on a CUDA image whose $CXX ships only a static libstdc++: the extension
    got its own copy of the C++ runtime beside torch's, and formatting a number
    into an error message crashed the interpreter (iostream state split between
    the two copies). Linking against the library already in the process keeps
    one runtime; elsewhere it is the library the compiler would pick anyway.
    """
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libstdc++.so" in path:
                    return (path,)
    except OSError:  # not Linux
        pass
    return ()


def _flags(device_type: str, arch: Optional[str]) -> dict[str, list[str]]:
    ldflags = _runtime_libstdcxx()
    if device_type == "cpu":
        return {"extra_cflags": list(CPU_CFLAGS), "extra_ldflags": [*CPU_LDFLAGS, *ldflags]}
    number = arch.removeprefix("sm_")
    gencode = f"-gencode=arch=compute_{number},code=sm_{number}"
    return {"extra_cflags": list(CUDA_HOST_CFLAGS), "extra_cuda_cflags": [*CUDA_CFLAGS, gencode],
            "extra_ldflags": list(ldflags)}


def _check_toolchain(device_type: str) -> None:
    """Fail early, in one clear sentence, when no compiler is there at all."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise KernelBuildError(f"no C++ compiler: {compiler!r} is not on PATH "
                               "(install g++, or set CXX)")
    if device_type == "cuda" and cpp_extension.CUDA_HOME is None:
        raise KernelBuildError("no CUDA toolkit: nvcc not found (install it, or set CUDA_HOME)")


def build_key(sources: list[Path], device_type: str, arch: Optional[str],
              flags: dict[str, list[str]]) -> str:
    """Hash of everything that makes a compiled extension differ."""
    h = hashlib.sha256()
    # Headers beside the sources, and one folder up (csrc/: shared by the CPU and CUDA sources).
    headers = sorted({p for s in sources for folder in (s.parent, s.parent.parent) for p in folder.iterdir()
                      if p.suffix in HEADER_SUFFIXES and p.is_file()})
    for path in [*sources, *headers]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    target = arch if device_type == "cuda" else f"cpu-{platform.machine()}-{_host_cpu()}"
    for part in (torch.__version__, str(torch.version.cuda), target,
                 f"py{sys.version_info.major}.{sys.version_info.minor}", repr(sorted(flags.items()))):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _lock_file(path: Path):
    """Take an exclusive OS lock on `path`. Returns (open file, locked); closing unlocks."""
    handle = open(path, "a+")  # noqa: SIM115 - closed by the caller
    try:
        import fcntl
    except ImportError:  # Windows: no flock; fall back to the age of torch's lock.
        return handle, False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        logger.warning("waiting for another process that is building %s", path.with_suffix(""))
        fcntl.flock(handle, fcntl.LOCK_EX)
    return handle, True


def clear_stale_lock(build_dir: Path, have_flock: bool) -> bool:
    """Remove torch's `lock` left by a killed build; True if one was removed.

    Called while holding the directory's flock: no live minideploy builder can
    then own the lock, whatever its age. Without flock, only old locks go.
    """
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if not have_flock and age < STALE_LOCK_SECONDS:
        return False
    logger.warning("removing stale build lock %s (%.0f s old, left by an interrupted build)",
                   lock, age)
    lock.unlink(missing_ok=True)
    return True


def build_extension(name: str, device_type: str, arch: Optional[str] = None) -> ModuleType:
    """Compile (or find already compiled) and import one extension. Uncached."""
    from torch.utils import cpp_extension

    sources = _sources(name, device_type)
    _check_toolchain(device_type)
    flags = _flags(device_type, arch)
    key = build_key(sources, device_type, arch, flags)
    module_name = f"minideploy_{name}_{device_type}_{key}"
    build_dir = cache_root() / module_name
    build_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock:
        handle, locked = _lock_file(build_dir.with_suffix(".flock"))
        try:
            clear_stale_lock(build_dir, have_flock=locked)
            fresh = not any(build_dir.glob(f"{module_name}*.so")) and not any(
                build_dir.glob(f"{module_name}*.pyd"))
            if fresh:
                logger.info("compiling %s in %s (once; about a minute)", module_name, build_dir)
            start = time.perf_counter()
            module = cpp_extension.load(
                name=module_name,
                sources=[str(s) for s in sources],
                build_directory=str(build_dir),
                verbose=False,
                # Copies: torch appends its own libraries to these lists in place.
                **{kind: list(values) for kind, values in flags.items()},
            )
            if fresh:
                logger.info("compiled %s in %.1f s", module_name, time.perf_counter() - start)
            return module
        finally:
            handle.close()


@functools.cache
def load(name: str, device_type: str, arch: Optional[str] = None) -> ModuleType:
    """The extension `name` for `device_type` ("cpu" or "cuda"; CUDA needs `arch`).

    Raises KernelBuildError when it cannot be built. Cached: built once per process.
    """
    if device_type == "cuda" and arch is None:
        raise KernelBuildError("a CUDA extension needs the GPU architecture (e.g. 'sm_90')")
    try:
        return build_extension(name, device_type, arch)
    except KernelBuildError:
        raise
    except (RuntimeError, OSError, ImportError, ValueError) as e:
        # Compiler missing, compile error, no CUDA toolkit, unwritable cache, ...
        message = str(e)
        if len(message) > MAX_ERROR_CHARS:
            # The compiler's diagnostics come last, after the long command line.
            message = (f"{message.splitlines()[0][:200]} ... {message[-MAX_ERROR_CHARS:]} "
                       f"(shortened; build_extension({name!r}, {device_type!r}, {arch!r}) "
                       "raises the whole log)")
        raise KernelBuildError(f"building the {device_type} extension {name!r} failed: {message}") from e


@functools.cache
def try_load(name: str, device_type: str, arch: Optional[str] = None) -> Optional[ModuleType]:
    """Like `load`, but None (and one warning per process) when the build fails."""
    try:
        return load(name, device_type, arch)
    except KernelBuildError as e:
        warnings.warn(f"minideploy: using the PyTorch reference instead of compiled kernels. {e}",
                      RuntimeWarning, stacklevel=4)
        return None


# kernels._extension's answers: (kernels.mode(), extension, device) -> module or None.
resolved: dict = {}


def clear_caches() -> None:
    """Forget loaded extensions and past failures (tests, or after installing a compiler)."""
    load.cache_clear()
    try_load.cache_clear()
    resolved.clear()
