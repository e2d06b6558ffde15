"""The engines of `caiforge plan` (see `caiforge.planning`): the transformers engines without a model.

They load the tokenizer only and compute keys and batches with the real engines' own code; only the forward passes
are replaced, by a placeholder answer (marked, so that a prompt built on it counts as `depends`) or even odds.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from caiforge import models, rowcache
from caiforge.config import StageError
from caiforge.engines import Completion, hf
from caiforge.planmode import MARK, PENDING, Context, active


def _pending_identity(model_dir: str | Path, ctx: Context) -> str | None:
    here = Path(model_dir).resolve()
    for out in ctx.pending:
        if here == Path(out).resolve() or Path(out).resolve() in here.parents:
            return PENDING + str(model_dir)
    return None


def _mark_depends(engine: Any, k: str, text: str) -> str:
    if engine.identity.startswith(PENDING) or MARK in text:
        engine.cache.depends.add(k)
    return k


def _placeholder(*parts: Any) -> str:
    return MARK + hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


class PlanGenerator(hf.TransformersGenerator):
    """Keys and batches as the real generator makes them; a placeholder answer instead of a forward pass."""

    def key(self, text: str, seed: int, plen: int) -> str:
        return _mark_depends(self, super().key(text, seed, plen), text)

    def _generate(self, prompts: list[list[int]], seeds: list[int], plen: int) -> list[Completion]:
        return [Completion(_placeholder(p, s), len(p), 0, True) for p, s in zip(prompts, seeds, strict=True)]


class PlanScorer(hf.TransformersChoiceScorer):
    """Keys and batches as the real scorer makes them; even odds instead of a forward pass."""

    GENERATOR = PlanGenerator

    def key(self, text: str, plen: int, options: Sequence[str]) -> str:
        return _mark_depends(self, super().key(text, plen, options), text)

    def _score(self, batch: list[Any], plen: int) -> list[tuple[int, int, float]]:
        return [(req, opt, math.log(0.5)) for row in batch for req, opt, _ in row.reads]


def engine(kind: str, model_dir: str | Path, cfg: Any, cache: Any) -> Any:
    """The plan-mode engine for `make_generator` (kind "generator") or `make_choice_scorer` ("scorer")."""
    from transformers import AutoTokenizer

    ctx = active()
    assert ctx is not None
    if cfg.backend != "transformers":
        raise StageError(f"caiforge plan counts requests of the transformers backend only; this one is {cfg.backend}")
    try:
        path = models.resolve(model_dir)
    except (FileNotFoundError, ValueError) as err:
        raise StageError(f"{model_dir}: not built yet, so its requests cannot be planned ({err})") from err
    device, dtype = hf.resolve_device(cfg.device, cfg.dtype)
    cls = PlanGenerator if kind == "generator" else PlanScorer
    with models.quiet_progress():
        tokenizer = AutoTokenizer.from_pretrained(path)
    made = cls(None, tokenizer, cfg, device, str(dtype).removeprefix("torch."))
    made.identity = _pending_identity(model_dir, ctx) or hf.weights_fingerprint(model_dir)
    made.cache = cache if cache is not None else rowcache.PlanCache(None)
    return made
