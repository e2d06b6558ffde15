"""The engines of `caiforge plan` (see `caiforge.planning`): the real engines without a model or a request.

They load the tokenizer only and compute keys and batches with the real engines' own code; only the forward passes
(transformers) or the requests (openai) are replaced, by a placeholder answer (marked, so that a prompt built on it
counts as `depends`) or even odds. The openai engines ask their servers one thing, which model they serve (GET
/v1/models), since that is part of every key.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from caiforge import models, rowcache
from caiforge.config import StageError
from caiforge.engines import OPTIONS, Completion, Shard, cache_lookup, fill_in, hf, identity
from caiforge.planmode import MARK, PENDING, active


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

    def reply_key(self, head: str, plen: int, turn: str) -> str:
        return _mark_depends(self, super().reply_key(head, plen, turn), head + turn)

    def _score(self, batch: list[Any], plen: int) -> list[tuple[int, int, float]]:
        return [(req, opt, math.log(0.5)) for row in batch for req, opt, _ in row.reads]


class _PlanRequests:
    """The openai engines' request path with placeholders for the answers the cache lacks (no request sent)."""

    cache: Any
    stats: Any
    weights: str | None

    def placeholder(self, payload: dict) -> Any:
        raise NotImplementedError

    def cached_run(
        self, keys: list[str], payloads: list[dict], parse: Any, desc: str, shard: Shard | None = None
    ) -> list[Any]:
        pending = (self.weights or "").startswith(PENDING)
        for k, payload in zip(keys, payloads, strict=True):
            if pending or MARK in payload["prompt"]:
                self.cache.depends.add(k)
        reuse = self.weights is not None
        found, todo = cache_lookup(self.cache, keys, self.stats, shard, reuse=reuse)
        for k, i in todo.items():
            found[i] = self.placeholder(payloads[i])
            if reuse:
                self.cache.put([(k, found[i])])
        return fill_in(found, keys, shard)


def _openai_classes() -> tuple[type, type]:
    from caiforge.engines import openai

    class PlanOpenAIGenerator(_PlanRequests, openai.OpenAIGenerator):
        def placeholder(self, payload: dict) -> dict:
            return Completion(_placeholder(payload["prompt"], payload["seed"]), 0, 0, True).as_dict()

    class PlanOpenAIScorer(_PlanRequests, openai.OpenAIChoiceScorer):
        options = 2
        GENERATOR = PlanOpenAIGenerator

        def placeholder(self, payload: dict) -> list[float]:
            return [math.log(0.5)] * self.options

        def choice_logprobs(self, conversations: Any, prefills: Any, options: Sequence[str] = OPTIONS) -> Any:
            self.options = len(options)
            return super().choice_logprobs(conversations, prefills, options)

    return PlanOpenAIGenerator, PlanOpenAIScorer


def _openai_engine(kind: str, model_dir: str | Path, cfg: Any, cache: Any) -> Any:
    from caiforge.engines import openai

    try:
        tokenizer = openai.load_tokenizer(model_dir, cfg.server)
    except (FileNotFoundError, ValueError) as err:
        raise StageError(f"{model_dir}: no tokenizer yet, so its requests cannot be planned ({err})") from err
    ctx = active()
    assert ctx is not None
    weights = identity.weights(model_dir, cfg.server, ctx.pending)
    generator, scorer = _openai_classes()
    made = (generator if kind == "generator" else scorer)(tokenizer, cfg, weights)
    made.cache = cache if cache is not None else rowcache.PlanCache(None)
    return made


def engine(kind: str, model_dir: str | Path, cfg: Any, cache: Any) -> Any:
    """The plan-mode engine for `make_generator` (kind "generator") or `make_choice_scorer` ("scorer")."""
    from transformers import AutoTokenizer

    ctx = active()
    assert ctx is not None
    if cfg.backend == "openai":
        return _openai_engine(kind, model_dir, cfg, cache)
    try:
        path = models.resolve(model_dir)
    except (FileNotFoundError, ValueError) as err:
        raise StageError(f"{model_dir}: not built yet, so its requests cannot be planned ({err})") from err
    device, dtype = hf.resolve_device(cfg.device, cfg.dtype)
    cls = PlanGenerator if kind == "generator" else PlanScorer
    with models.quiet_progress():
        tokenizer = AutoTokenizer.from_pretrained(path)
    made = cls(None, tokenizer, cfg, device, str(dtype).removeprefix("torch."))
    made.identity = identity.weights(model_dir, outputs=ctx.pending)
    made.cache = cache if cache is not None else rowcache.PlanCache(None)
    return made
