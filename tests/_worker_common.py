"""What the subprocess workers of the DDP tests share (they run as scripts from tests/, so this imports as a
plain module)."""

from __future__ import annotations


def close_process_group() -> None:
    """Tear the gloo process group down before the interpreter exits: left to the exit handlers, its C++ threads
    are sometimes destroyed while still joinable and the process aborts ("terminate called without an active
    exception", exit -6) after all its work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
