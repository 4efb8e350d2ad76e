"""A one-line progress bar: step, loss, validation loss, tokens/s, ETA and the latest alert.

On a terminal the line is redrawn in place; otherwise (CI logs, files) a plain line is printed at
most every `plain_every_s` seconds so logs stay readable.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


class ProgressBar:
    def __init__(
        self, total_steps: int, stream: TextIO | None = None, enabled: bool = True, plain_every_s: float = 10.0
    ):
        self.total = total_steps
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.plain_every_s = plain_every_s
        self._last_plain = 0.0
        self._drawn = False

    def update(
        self, step: int, loss: float, tokens_per_s: float, eta_s: float, val_loss: float | None = None, alert: str = ""
    ) -> None:
        if not self.enabled:
            return
        width = 24
        done = int(width * step / max(1, self.total))
        parts = [
            f"[{'#' * done}{'.' * (width - done)}] {step}/{self.total}",
            f"loss {loss:.3f}",
        ]
        if val_loss is not None:
            parts.append(f"val {val_loss:.3f}")
        parts += [f"{format_count(tokens_per_s)} tok/s", f"ETA {format_duration(eta_s)}"]
        if alert:
            parts.append(f"! {alert}")
        line = " | ".join(parts)
        if self.tty:
            cols = shutil.get_terminal_size((120, 20)).columns
            self.stream.write("\r" + line[: cols - 1].ljust(cols - 1))
            self.stream.flush()
            self._drawn = True
        elif time.monotonic() - self._last_plain >= self.plain_every_s or step >= self.total:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_plain = time.monotonic()

    def message(self, text: str) -> None:
        """Print a line above the bar (alerts, evaluations) without breaking it."""
        if not self.enabled:
            return
        if self._drawn:
            self.stream.write("\r" + " " * (shutil.get_terminal_size((120, 20)).columns - 1) + "\r")
            self._drawn = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
