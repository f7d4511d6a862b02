"""Write a benchmark's section of bench/RESULTS.md (between markers), atomically."""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from mentor import atomic

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    """One line about the machine the numbers came from."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section ``name`` of RESULTS.md with ``body`` plus the command that made it."""
    command = "python " + " ".join([Path(sys.argv[0]).as_posix().split("/main/")[-1], *sys.argv[1:]])
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    section = (f"{begin}\n## {name}\n\nCommand: `{command}` ({stamp}; {machine()})\n\n{body.strip()}\n{end}")
    header = "# Benchmark results\n\nEach section is rewritten by its script.\n"
    text = RESULTS.read_text() if RESULTS.exists() else header
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    atomic.write_text(RESULTS, text)


def stable_malloc() -> bool:
    """Keep glibc from returning large freed blocks to the OS (fixed mmap and trim thresholds of 1 GiB).

    With glibc's dynamic thresholds the same bare teacher loop measured 105 to 190 ms here, depending on whether
    the previous batch's outputs were still alive when the next batch allocated; fixed thresholds make both the
    bare loop and the build stable. Returns whether it was applied (glibc only)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False
