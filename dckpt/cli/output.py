"""Terminal output shared by the commands: colour only on a terminal, sizes, JSON, progress."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from datetime import datetime

from ..format.manifest import encode_nonfinite
from ..format.units import human_size as size  # noqa: F401 (re-exported for the commands)

_CODES = {"green": "32", "yellow": "33", "red": "31", "bold": "1", "dim": "2", "cyan": "36"}


def add_output_arguments(parser, json_help: str = "print a JSON document instead") -> None:
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colour the report (auto: only on a terminal, unless NO_COLOR)")


class Style:
    def __init__(self, mode: str = "auto", stream=None):
        stream = stream or sys.stdout
        if mode == "auto":
            self.on = (hasattr(stream, "isatty") and stream.isatty()
                       and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb")
        else:
            self.on = mode == "always"

    def __call__(self, text: str, *styles: str) -> str:
        if not self.on or not styles:
            return text
        codes = ";".join(_CODES[s] for s in styles)
        return f"\033[{codes}m{text}\033[0m"


def print_json(doc) -> None:
    # Non-finite metrics as the manifest stores them ({"$float": "nan"}): JSON has no NaN.
    json.dump(encode_nonfinite(doc), sys.stdout, indent=2, sort_keys=False, default=str,
              allow_nan=False)
    sys.stdout.write("\n")




def when(ts: float | None) -> str:
    if ts is None or not math.isfinite(ts):
        return "-"
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def counts(summary: dict) -> str:
    return (f"{summary['passed']} passed, {plural(summary['warnings'], 'warning')}, "
            f"{plural(summary['errors'], 'error')}")


def number(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def table(rows: list[list[str]], header: list[str], style: Style | None = None,
          right: set[int] = frozenset()) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    head = line(header)
    return [style(head, "bold") if style else head, *(line(r) for r in rows)]


class Progress:
    """A one-line progress bar on stderr, for runs long enough to need one.

    Drawn only when stderr is a terminal (or `force`), first after `delay` seconds, at most
    ten times a second; `close()` erases it."""

    def __init__(self, label: str, enabled: bool = True, force: bool = False,
                 delay: float = 0.5, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = force or (enabled and hasattr(self.stream, "isatty")
                                 and self.stream.isatty())
        self.label, self.delay = label, delay
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.t0 < self.delay or (now - self.last < 0.1 and done < total):
            return
        self.last = now
        frac = done / total if total else 1.0
        width = 30
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        rate = done / (now - self.t0) / 1e9
        self.stream.write(f"\r{self.label} [{bar}] {frac:4.0%} {size(done)}/{size(total)} "
                          f"{rate:.2f} GB/s ")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.drawn = False
