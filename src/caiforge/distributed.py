"""The processes of one stage under `accelerate launch` (torchrun underneath): who this process is, and gathering.

Training is accelerate's and TRL's business. What is ours is the generation a training stage does besides training
(distill's teacher answers): either every process runs its share of the requests and the answers are gathered back
into row order (`engines.chat_shared`), or the main process alone asks them, of servers it starts, while the others
wait (`on_main`); either way every process holds the answers one process would have made.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

T = TypeVar("T")

MAIN_WAIT = timedelta(hours=72)
"""How long the other processes wait for the main process's `on_main` work (a big teacher's answers on servers
take hours; the collective default, 30 minutes, would kill the run). A crashed main process ends the wait at once:
accelerate stops every process when one fails."""


def rank() -> int:
    """This process's global rank (0 for a plain process)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Processes of this run: 1 for a plain process, WORLD_SIZE under `accelerate launch` / torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init() -> None:
    """Under several processes: join the process group and bind this process to its own GPU (LOCAL_RANK) before
    the stage loads a model, so that `device: auto` ("cuda") means this process's GPU. A plain process: nothing."""
    if world_size() > 1:
        from datetime import timedelta

        import torch
        from accelerate import PartialState

        # Without a GPU accelerate goes multi-process only when told `cpu` (gloo); the timeout is the Trainer's
        # ddp_timeout default, as rank 0 may evaluate on its own meanwhile.
        PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=1800))


def gather(items: list) -> list:
    """Every process's `items`, concatenated in rank order, on every process."""
    if world_size() == 1:
        return list(items)
    from accelerate.utils import gather_object

    init()
    return list(gather_object(items))


def on_main(work: Callable[[], T]) -> T:
    """`work()` run by the main process (rank 0) alone, its result handed to every process; the others wait for it
    up to `MAIN_WAIT`, on a gloo group of their own (CPU objects, whatever the training backend). A plain process
    just runs it."""
    if world_size() == 1:
        return work()
    import torch.distributed as dist

    init()
    group = dist.new_group(backend="gloo", timeout=MAIN_WAIT)  # every process creates it, in the same order
    box = [work() if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, group=group)
    dist.destroy_process_group(group)
    return box[0]  # type: ignore[return-value]
