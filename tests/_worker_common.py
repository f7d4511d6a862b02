"""What the subprocess workers of the DDP tests share (they run as scripts from tests/, so this imports as a
plain module)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any


def close_process_group() -> None:
    """Tear the gloo process group down, if one is up."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run(main: Callable[..., Any], *args: Any) -> None:
    """Run a worker's ``main`` and end the process.

    After a normal return the process leaves with ``os._exit(0)`` once the process group is down and the output
    flushed: with torch 2.13's gloo backend, process 0 (which hosts the TCP store) sometimes aborted in C++ static
    destructors at interpreter teardown ("terminate called without an active exception", exit -6, no Python frame
    left) after all its work and reports were written, about once in eight runs. An exception still propagates
    and exits the usual way (code 1), so a failing worker is never reported as a success.
    """
    try:
        main(*args)
    finally:
        close_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
