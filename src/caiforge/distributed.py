"""The processes of one stage under `accelerate launch` (torchrun underneath): who this process is, and gathering.

Training is accelerate's and TRL's business. What is ours is the generation a training stage does besides training
(distill's teacher answers): every process runs its share of the requests and the answers are gathered back into
row order (`engines.chat_shared`), so every process holds the answers one process would have made.
"""

from __future__ import annotations

import os


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
