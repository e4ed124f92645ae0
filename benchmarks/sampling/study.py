"""What the sampling studies (nfe.py, reuse.py) share: progress lines with the time since the
start, their three outputs (NAME.json, NAME.md, NAME.png) written in one place, and the
argparse type of their sample counts."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path


def progress_printer() -> Callable[[str], None]:
    """say(message): the message, after the seconds since this call, flushed."""
    started = time.perf_counter()
    return lambda message: print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)


def write_study(out: Path, name: str, data: dict, table: str, draw: Callable[[Path], None]) -> None:
    """out/NAME.json (data), out/NAME.md (table) and out/NAME.png (drawn by ``draw``); prints the table."""
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    (out / f"{name}.md").write_text(table)
    draw(out / f"{name}.png")
    print(table)


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``low`` (argparse names the option in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer of at least {low}, got {value}")
        return value

    return parse
