"""The `transformers` engine: a local Hugging Face causal LM, batched, with the shared prompt prefix computed once.

What it does for speed:

- renders each conversation with the tokenizer's chat template, sorts by token length (longest first) and cuts
  batches, so that a batch holds prompts of similar length and left padding wastes little;
- prefix reuse: the rows of one call usually share a long prefix (system prompt + few-shot demos). Its KV cache is
  computed once per call and copied into every batch, so only each row's own suffix is run (padding sits between
  the shared prefix and the suffixes; position ids count real tokens only, so the model sees the same positions);
- its own decoding loop: rows that finish leave the batch (their KV rows are dropped), and the LM head runs on the
  last position only;
- `dtype: auto` runs bf16 on CUDA and on CPUs with native bf16 (AMX / AVX512-BF16), fp32 elsewhere.

What it does for reproducibility:

- every decoding setting is explicit (temperature, top-p, top-k; no repetition penalty, nothing read from a model's
  generation_config.json);
- each row samples with its own `torch.Generator` seeded by `row_seed(seed, prompt)`: its draws do not depend on the
  other rows of its batch or call (up to floating-point effects of batch shape), and no global RNG is touched;
- a row stops at the chat template's end token or EOS, and is marked unfinished when it hits `max_new_tokens`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from caiforge.engines import (
    OPTIONS,
    Completion,
    GenerationConfig,
    Message,
    ScoringConfig,
    Stats,
    row_seed,
)
from caiforge.engines.rendering import common_prefix, encode, plan_options, render_chat, stop_token_ids

log = logging.getLogger(__name__)

MIN_PREFIX = 8
"""Shared prefixes shorter than this are not worth a separate forward pass."""


def cpu_has_native_bf16() -> bool:
    """True on CPUs whose bf16 matmuls beat fp32 (AMX tiles or AVX512-BF16)."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def resolve_device(device: str, dtype: str) -> tuple[str, torch.dtype]:
    """`auto` resolved: CUDA when available; bf16 on CUDA and on CPUs with native bf16, else fp32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but CUDA is not available")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" or cpu_has_native_bf16() else "float32"
    return device, {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def load_for_inference(model_dir: str | Path, device: str, dtype: str) -> tuple[Any, Any, str]:
    """(model, tokenizer, device) for a saved causal LM, with `auto` device/dtype resolved."""
    from caiforge import models

    device, torch_dtype = resolve_device(device, dtype)
    with models.quiet_progress():
        model, tokenizer = models.load_pretrained(
            model_dir, dtype=str(torch_dtype).removeprefix("torch."), device=device
        )
    return model, tokenizer, device


def weights_fingerprint(model_dir: str | Path) -> str:
    """The sha256 fingerprint of a saved model's files (a role link is followed)."""
    from caiforge import models

    return models.fingerprint(models.file_digests(models.resolve(model_dir)))


def _from_dir(cls: Any, model_dir: str | Path, cfg: GenerationConfig | ScoringConfig) -> Any:
    """An engine of class `cls` on the saved model in `model_dir`, with the weights' fingerprint as identity."""
    model, tokenizer, device = load_for_inference(model_dir, cfg.device, cfg.dtype)
    engine = cls(model, tokenizer, cfg, device)
    engine.identity = weights_fingerprint(model_dir)
    return engine


class _Runner:
    """The forward passes both engines share: a prefix cache, then padded suffixes behind it."""

    def __init__(self, model: Any, tokenizer: Any, device: str, backend_stats: Stats) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.stats = backend_stats
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token to pad batches with")
        self.pad_id = pad
        self.stats.engine = {
            "backend": "transformers",
            "device": device,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        }

    def prefix_cache(self, ids: Sequence[int]) -> Any:
        """The KV cache of `ids` (batch 1), to be copied into every batch of the call."""
        out = self.model(input_ids=torch.tensor([list(ids)], device=self.device), use_cache=True, logits_to_keep=1)
        return out.cache

    def forward(
        self, rows: Sequence[Sequence[int]], prefix: tuple[int, Any], keep: int
    ) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
        """Run rows (each starting with the `prefix[0]` shared tokens) left-padded behind the prefix cache.

        Returns the logits of the last `keep` positions, the cache, the attention mask and each row's last position.
        """
        plen, cache = prefix
        width = max(len(r) for r in rows) - plen
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        own = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row) - plen
            ids[i, width - n :] = torch.tensor(row[plen:], dtype=torch.long)
            own[i, width - n :] = 1
        mask = torch.cat([torch.ones((len(rows), plen), dtype=torch.long), own], dim=1)
        # Positions count real tokens only: padding between the prefix and a row's suffix must not shift it.
        positions = plen + (own.cumsum(-1) - 1).clamp(min=0)
        past = None
        if plen:
            past = copy.deepcopy(cache)
            past.reorder_cache(torch.zeros(len(rows), dtype=torch.long, device=self.device))
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            cache=past,
            use_cache=True,
            logits_to_keep=keep,
        )
        return out.logits, out.cache, mask.to(self.device), positions[:, -1].to(self.device)

    def shared_prefix(self, rows: Sequence[Sequence[int]], limit: int, enabled: bool) -> tuple[int, Any]:
        """(length, cache) of the prefix every row shares, at most `limit` tokens; (0, None) when not worth it."""
        plen = min(common_prefix(rows), limit) if enabled and len(rows) > 1 else 0
        if plen < MIN_PREFIX:
            return 0, None
        self.stats.prefix_tokens_reused += plen * (len(rows) - 1)
        return plen, self.prefix_cache(rows[0][:plen])


class TransformersGenerator:
    """Batched, length-grouped, reproducible generation with a local Hugging Face causal LM."""

    def __init__(self, model: Any, tokenizer: Any, cfg: GenerationConfig, device: str = "cpu") -> None:
        self.cfg = cfg
        self.stats = Stats()
        self.runner = _Runner(model, tokenizer, device, self.stats)
        self.model, self.tokenizer, self.device = self.runner.model, tokenizer, device
        self.stop_ids = stop_token_ids(tokenizer)
        self.identity = "transformers:in-memory"

    @classmethod
    def from_dir(cls, model_dir: str | Path, cfg: GenerationConfig) -> TransformersGenerator:
        return _from_dir(cls, model_dir, cfg)

    def render(self, conversation: Sequence[Message]) -> list[int]:
        return encode(self.tokenizer, render_chat(self.tokenizer, conversation))

    def chat(self, conversations: Sequence[Sequence[Message]], *, seed: int, desc: str = "") -> list[Completion]:
        if not conversations:
            return []
        texts = [render_chat(self.tokenizer, c) for c in conversations]
        prompts = [encode(self.tokenizer, t) for t in texts]
        seeds = [row_seed(seed, t) for t in texts]
        # Longest first: the slowest batch runs while the bar is fresh, and similar lengths share a batch.
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        results: list[Completion | None] = [None] * len(prompts)
        with torch.inference_mode(), progress(len(prompts), desc or "generate", self.cfg.progress) as bar:
            t0 = time.perf_counter()
            prefix = self.runner.shared_prefix(prompts, min(len(p) for p in prompts) - 1, self.cfg.prefix_reuse)
            for start in range(0, len(order), self.cfg.batch_size):
                batch = order[start : start + self.cfg.batch_size]
                outs = self._generate([prompts[i] for i in batch], [seeds[i] for i in batch], prefix)
                for i, out in zip(batch, outs, strict=True):
                    results[i] = out
                    self.stats.rows += 1
                    self.stats.prompt_tokens += out.prompt_tokens
                    self.stats.completion_tokens += out.completion_tokens
                self.stats.seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{self.stats.tokens_per_second:.0f}")
        return [r for r in results if r is not None]

    def _generate(self, prompts: list[list[int]], seeds: list[int], prefix: tuple[int, Any]) -> list[Completion]:
        gens = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        logits, cache, mask, last_pos = self.runner.forward(prompts, prefix, keep=1)
        logits = logits[:, -1]
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        active = list(range(len(prompts)))
        stop = set(self.stop_ids)
        for _ in range(self.cfg.max_new_tokens):
            picked = self._pick(logits.float(), [gens[r] for r in active])
            for token, r in zip(picked.tolist(), active, strict=True):
                new[r].append(token)
                done[r] = token in stop or len(new[r]) >= self.cfg.max_new_tokens
            keep = [j for j, r in enumerate(active) if not done[r]]
            if not keep:
                break
            if len(keep) < len(active):  # finished rows leave the batch
                index = torch.tensor(keep, device=self.device)
                cache.reorder_cache(index)
                mask, last_pos, picked = mask[index], last_pos[index], picked[index]
                active = [active[j] for j in keep]
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=self.device)], dim=1)
            last_pos = last_pos + 1
            logits = self.runner.model(
                input_ids=picked[:, None],
                attention_mask=mask,
                position_ids=last_pos[:, None],
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
        completions = []
        for ids, toks in zip(prompts, new, strict=True):
            finished = bool(toks) and toks[-1] in stop
            text_ids = toks[:-1] if finished else toks
            text = self.tokenizer.decode(text_ids, skip_special_tokens=True).strip()
            completions.append(Completion(text, len(ids), len(toks), finished))
        return completions

    def _pick(self, logits: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        """Next token per row: argmax when greedy, else temperature / top-k / top-p sampling with the row's RNG."""
        cfg = self.cfg
        if cfg.temperature == 0:
            return logits.argmax(-1)
        logits = logits / cfg.temperature
        if cfg.top_k:
            kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if cfg.top_p < 1:
            ranked, index = torch.sort(logits, dim=-1, descending=True)
            probs = torch.softmax(ranked, dim=-1)
            # Drop a token when the mass ranked above it already reaches top_p (the top token always stays).
            drop = probs.cumsum(-1) - probs >= cfg.top_p
            logits = logits.scatter(-1, index, ranked.masked_fill(drop, float("-inf")))
        probs = torch.softmax(logits, dim=-1)
        return torch.cat([torch.multinomial(probs[j], 1, generator=g) for j, g in enumerate(gens)])


@dataclass(frozen=True)
class _Row:
    """One sequence to run: `ids`, and the (request, option, continuation) read from it."""

    ids: tuple[int, ...]
    reads: tuple[tuple[int, int, tuple[int, ...]], ...]
    start: int
    """Index in `ids` of the first continuation token (= len(context))."""


class TransformersChoiceScorer:
    """Choice scoring with a local Hugging Face causal LM: batched, length-grouped, left-padded, deterministic.

    When every option is a single token after the context, one forward pass reads them all (the fast path);
    otherwise each option is scored as a sequence (sum of its tokens' log-probabilities).
    """

    def __init__(self, model: Any, tokenizer: Any, cfg: ScoringConfig, device: str = "cpu") -> None:
        self.cfg = cfg
        self.stats = Stats()
        self.runner = _Runner(model, tokenizer, device, self.stats)
        self.model, self.tokenizer, self.device = self.runner.model, tokenizer, device
        self.identity = "transformers:in-memory"

    @classmethod
    def from_dir(cls, model_dir: str | Path, cfg: ScoringConfig) -> TransformersChoiceScorer:
        return _from_dir(cls, model_dir, cfg)

    def render(self, conversation: Sequence[Message], prefill: str) -> str:
        return render_chat(self.tokenizer, conversation, prefill)

    def generator(self, cfg: GenerationConfig) -> TransformersGenerator:
        """A generator on the same weights (no second copy in memory), e.g. for chain-of-thought reasoning."""
        engine = TransformersGenerator(self.model, self.tokenizer, cfg, self.device)
        engine.identity = self.identity
        return engine

    def choice_logprobs(
        self,
        conversations: Sequence[Sequence[Message]],
        prefills: Sequence[str],
        options: Sequence[str] = OPTIONS,
    ) -> list[tuple[float, ...]]:
        if len(conversations) != len(prefills):
            raise ValueError(f"{len(conversations)} conversations but {len(prefills)} prefills")
        rows: list[_Row] = []
        for req, (conv, prefill) in enumerate(zip(conversations, prefills, strict=True)):
            plan = plan_options(self.tokenizer, self.render(conv, prefill), options)
            start = len(plan.context)
            if plan.single_token:
                reads = tuple((req, o, c) for o, c in enumerate(plan.continuations))
                rows.append(_Row(plan.context, reads, start))
            else:
                for o, c in enumerate(plan.continuations):
                    rows.append(_Row(plan.context + c[:-1], ((req, o, c),), start))
        out = [[0.0] * len(options) for _ in conversations]
        if not rows:
            return []
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].ids), i))
        with torch.inference_mode(), progress(len(rows), "score", self.cfg.progress) as bar:
            t0 = time.perf_counter()
            # The first option token is read at position start - 1, which must lie after the shared prefix.
            limit = min(r.start for r in rows) - 1
            prefix = self.runner.shared_prefix([r.ids for r in rows], limit, self.cfg.prefix_reuse)
            for begin in range(0, len(order), self.cfg.batch_size):
                batch = [rows[i] for i in order[begin : begin + self.cfg.batch_size]]
                for req, opt, value in self._score(batch, prefix):
                    out[req][opt] = value
                self.stats.seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                self.stats.rows += len(batch)
                self.stats.prompt_tokens += sum(len(r.ids) for r in batch)
                bar.update(len(batch))
        return [tuple(v) for v in out]

    def _score(self, batch: list[_Row], prefix: tuple[int, Any]) -> list[tuple[int, int, float]]:
        # Every read sits in the last `keep` positions (rows are left-padded, continuations end each row).
        keep = max(len(r.ids) - r.start + 1 for r in batch)
        logits, _, _, _ = self.runner.forward([r.ids for r in batch], prefix, keep=keep)
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        out = []
        for i, row in enumerate(batch):
            for req, opt, cont in row.reads:
                # Token k of the continuation is predicted at row position start - 1 + k; the row ends at tail
                # index keep - 1, at row position len(ids) - 1.
                first = keep - 1 - (len(row.ids) - row.start)
                total = sum(float(logprobs[i, first + k, tok]) for k, tok in enumerate(cont))
                out.append((req, opt, total))
        return out


@contextlib.contextmanager
def progress(total: int, desc: str, enabled: bool) -> Iterator[Any]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="row", disable=not enabled, mininterval=2.0)
    try:
        yield bar
    finally:
        bar.close()
