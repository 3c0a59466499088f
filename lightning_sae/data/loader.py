"""What the activation loaders share: the process's place in a DDP run, and a generator run
ahead of its consumer in a background thread (the cache's reader and the stream's model both
work while the training step runs)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import closing
from queue import Full, Queue
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_END = object()  # the producer's last item when it ran to the end


def in_background(
    batches: Iterator[T], depth: int, stop: threading.Event, name: str = "activation-prefetch"
) -> Iterator[T]:
    """``batches``, produced by a thread that runs up to ``depth`` batches ahead. Closing this
    generator sets ``stop`` and joins the thread; an error in the thread is raised here."""
    queue: Queue[object] = Queue(maxsize=depth)

    def put(item: object) -> bool:
        # A timeout, so a producer blocked on a full queue notices that the consumer left.
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.05)
                return True
            except Full:
                pass
        return False

    def produce() -> None:
        try:
            with closing(batches):
                for batch in batches:
                    if not put(batch):
                        return
        except BaseException as error:  # any: the consumer must not wait forever
            put(error)
        else:
            put(_END)

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while (item := queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
