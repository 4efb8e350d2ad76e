"""Device choice and memory reading: the bottom layer every other module may use."""

from __future__ import annotations

import resource
import sys

import torch

from moelab.errors import MoelabError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MoelabError("train.device = 'cuda' but no CUDA device is available; use 'cpu' or 'auto'")
    return torch.device(name)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss_kb * (1 if sys.platform == "darwin" else 1024))


def available_memory_bytes() -> int | None:
    """Memory the system can still give this process (Linux MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(needed_bytes: int, what: str, available: int | None = None) -> None:
    """Refuse, before allocating, work that needs more host memory than is available."""
    available = available_memory_bytes() if available is None else available
    if available is not None and needed_bytes > available:
        raise MoelabError(
            f"{what} needs about {needed_bytes / 2**30:.1f} GiB of memory and this machine has "
            f"{available / 2**30:.1f} GiB available; choose smaller sizes"
        )
