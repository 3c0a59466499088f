"""Run a function on a few CPU processes joined in one gloo group, and collect their reports."""

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _joined(
    rank: int, report_of: Callable[[int, int], Any], port: int, world: int, out: Path
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(report_of(rank, world), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def reports_of_ranks(report_of: Callable[[int, int], Any], world: int, out: Path) -> list[Any]:
    """``report_of(rank, world)`` in ``world`` processes (a module-level function, so that the
    processes can import it), each in the gloo group of them all; its return values in rank
    order (saved under ``out`` with torch.save: tensors, numbers, strings and containers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_joined, args=(report_of, port, world, out), nprocs=world)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]
