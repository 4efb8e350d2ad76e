"""Compile a kernel's C source on first use and load it with ctypes.

The shared library is cached under $MOELAB_CACHE/kernels (default ~/.cache/moelab/kernels), named by
a hash of the source, the compiler command, the compiler's version and the CPU's instruction-set
flags (it is built with -march=native, so a cache shared between different machines never hands
one a library with instructions it lacks). It is compiled to a temporary file and renamed into
place, so concurrent first uses never load a half-written library.

Without a C compiler, or with the kernel's switch off (MOELAB_<NAME>=0, e.g. MOELAB_MOE_DECODE=0),
`load` returns None and callers take their PyTorch
path: the kernels are an optimisation, never a requirement.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
# NOTE: no -ffast-math: the kernels must treat NaN and infinity as PyTorch does, and keep sums in
# the order their comments give. -ffp-contract=fast allows fused multiply-adds (ISO C mode turns
# them off); -fno-math-errno only lets expf skip setting errno.
CFLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-fPIC", "-shared", "-std=c11")


class KernelBuildError(RuntimeError):
    """A kernel could not be compiled or loaded (the message says which command and why)."""


def cache_dir() -> Path:
    env = os.environ.get("MOELAB_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "moelab"
    return root / "kernels"


def compiler() -> str | None:
    """The C compiler: $CC, else cc, gcc or clang on PATH; None when there is none."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build(name: str, directory: Path | None = None) -> Path:
    """Compile SOURCE_DIR/<name>.c into the cache (if not there yet); returns the library's path.
    Raises KernelBuildError when there is no compiler or it fails."""
    cc = compiler()
    if cc is None:
        raise KernelBuildError("no C compiler found (set CC, or install cc / gcc / clang)")
    source = SOURCE_DIR / f"{name}.c"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"{cc} --version failed: {e}") from None
    key = hashlib.sha256()
    for part in (
        source.read_bytes(),
        " ".join((cc, *CFLAGS)).encode(),
        version.encode(),
        _cpu_flags().encode(),
        platform.machine().encode(),
    ):
        key.update(part)
        key.update(b"\0")
    directory = directory or cache_dir()
    library = directory / f"{name}-{key.hexdigest()[:16]}.so"
    if library.is_file():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=directory)
    os.close(fd)
    command = [cc, *CFLAGS, "-o", tmp, str(source), "-lm"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise KernelBuildError(
                f"{' '.join(command)} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}"
            )
        os.replace(tmp, library)  # atomic: a concurrent build renames an identical file
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"{' '.join(command)} failed: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return library


def switch_env(name: str) -> str:
    """The environment variable that switches kernel `name` off: moe_decode -> MOELAB_MOE_DECODE."""
    return "MOELAB_" + name.upper()


def load(name: str) -> ctypes.CDLL | None:
    """The compiled kernel library, or None when it is switched off (MOELAB_<NAME>=0) or cannot be
    built (a warning says why)."""
    env = switch_env(name)
    switch = os.environ.get(env, "1").strip().lower()
    if switch in ("0", "off", "false", "no"):
        return None
    if switch not in ("1", "on", "true", "yes", ""):
        log.warning(
            "%s=%r is not one of 0, off, false, no, 1, on, true, yes: the %s kernel stays on", env, switch, name
        )
    try:
        # NOTE: CDLL releases the GIL for the call, as PyTorch's own operators do, so a server's
        # other threads run while a kernel does (PyDLL, holding it, measured no faster).
        return ctypes.CDLL(str(build(name)))
    except (KernelBuildError, OSError) as e:
        log.warning("native kernel %s unavailable, using the PyTorch path: %s", name, e)
        return None
