"""The one place that asks a model for text.

Stages hand a list of chat conversations to a `Generator` and get one `Completion` per conversation back, in
order. Backends hide how: `TransformersGenerator` (here) runs a local Hugging Face model on CPU (fp32) or CUDA
(bf16); other backends (vLLM, an OpenAI-compatible HTTP server) implement the same `Generator` protocol and are
picked by `GenerationConfig.backend` in `make_generator`, so stages never change.

What the transformers backend does for speed and reproducibility:

- renders each conversation with the tokenizer's chat template, then sorts by token length (longest first) and
  cuts batches, so that each batch holds prompts of similar length and left-padding wastes little;
- stops each row at the chat template's end token (e.g. `<|im_end|>`) or the tokenizer's EOS;
- greedy decoding when temperature is 0; otherwise temperature / top-p sampling seeded per batch from
  `seed` and the batch's position, inside a forked RNG (no global random state leaks in or out): the same config
  and inputs give the same outputs on the same machine;
- shows a progress bar with rows done and generated tokens per second.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

log = logging.getLogger(__name__)

Message = dict[str, str]
"""A chat turn: {"role": "system" | "user" | "assistant", "content": text}."""


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate; every stage that generates has one of these in its params section."""

    backend: Literal["transformers"] = "transformers"
    """Which backend runs the model (more can be added without touching stages)."""
    batch_size: int = 16
    """Conversations per forward batch (grouped by length)."""
    max_new_tokens: int = 128
    """Cap on generated tokens per conversation; a row that hits it is marked unfinished."""
    temperature: float = 0.0
    """0 means greedy decoding; > 0 samples."""
    top_p: float = 1.0
    """Nucleus sampling mass (used only when temperature > 0)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when available, else CPU."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: bfloat16 on CUDA, float32 on CPU."""
    progress: bool = True
    """Show a progress bar (rows, tokens/s) on stderr."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"batch_size and max_new_tokens must be >= 1, got {self.batch_size}, {self.max_new_tokens}"
            )
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")


@dataclass(frozen=True)
class Completion:
    """One generated answer."""

    text: str
    """Decoded text, without the end token or padding."""
    prompt_tokens: int
    """Tokens in the rendered prompt."""
    completion_tokens: int
    """Generated tokens, the end token included."""
    finished: bool
    """True when the model emitted its end token; False when it hit max_new_tokens."""


@dataclass
class Stats:
    """Running totals a stage copies into its metrics."""

    rows: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "rows": self.rows,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 2),
        }


class Generator(Protocol):
    """What stages call. `seed` makes sampling reproducible; `desc` labels the progress bar."""

    stats: Stats

    def chat(self, conversations: Sequence[Sequence[Message]], *, seed: int, desc: str = "") -> list[Completion]: ...


def resolve_device(device: str, dtype: str) -> tuple[str, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("generation.device is 'cuda' but CUDA is not available")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return device, {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def make_generator(model_dir: str | Path, cfg: GenerationConfig) -> Generator:
    """The backend `cfg.backend` names, serving the model in `model_dir`."""
    if cfg.backend == "transformers":
        return TransformersGenerator.from_dir(model_dir, cfg)
    raise ValueError(f"generation.backend: unknown backend {cfg.backend!r}")


def load_for_inference(model_dir: str | Path, device: str, dtype: str) -> tuple[Any, Any, str]:
    """(model, tokenizer, device) for a saved causal LM, with `auto` device/dtype resolved (bf16 on CUDA)."""
    from caiforge import models

    device, torch_dtype = resolve_device(device, dtype)
    with models.quiet_progress():
        model, tokenizer = models.load_pretrained(
            model_dir, dtype=str(torch_dtype).removeprefix("torch."), device=device
        )
    return model, tokenizer, device


class TransformersGenerator:
    """Batched, length-grouped, reproducible generation with a local Hugging Face causal LM."""

    def __init__(self, model: Any, tokenizer: Any, cfg: GenerationConfig, device: str = "cpu") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = device
        self.stats = Stats()
        self.stop_ids = stop_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]

    @classmethod
    def from_dir(cls, model_dir: str | Path, cfg: GenerationConfig) -> TransformersGenerator:
        model, tokenizer, device = load_for_inference(model_dir, cfg.device, cfg.dtype)
        return cls(model, tokenizer, cfg, device)

    def render(self, conversation: Sequence[Message]) -> list[int]:
        text = self.tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat(self, conversations: Sequence[Sequence[Message]], *, seed: int, desc: str = "") -> list[Completion]:
        prompts = [self.render(c) for c in conversations]
        # Longest first: the slowest batch runs while the bar is fresh, and similar lengths share a batch.
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        results: list[Completion | None] = [None] * len(prompts)
        with _progress(len(prompts), desc or "generate", self.cfg.progress) as bar:
            for number, start in enumerate(range(0, len(order), self.cfg.batch_size)):
                batch = order[start : start + self.cfg.batch_size]
                t0 = time.perf_counter()
                outs = self._generate([prompts[i] for i in batch], seed=seed * 1_000_003 + number)
                self.stats.seconds += time.perf_counter() - t0
                for i, out in zip(batch, outs, strict=True):
                    results[i] = out
                    self.stats.rows += 1
                    self.stats.prompt_tokens += out.prompt_tokens
                    self.stats.completion_tokens += out.completion_tokens
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{self.stats.tokens_per_second:.0f}")
        return [r for r in results if r is not None]

    @torch.inference_mode()
    def _generate(self, prompts: list[list[int]], *, seed: int) -> list[Completion]:
        from transformers import GenerationConfig as HFGenerationConfig

        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids) :] = 1
        sample = self.cfg.temperature > 0
        # An explicit config, so a model's own generation_config.json (sampling defaults) cannot change our outputs.
        gen_cfg = HFGenerationConfig(
            max_new_tokens=self.cfg.max_new_tokens,
            do_sample=sample,
            temperature=self.cfg.temperature if sample else None,
            top_p=self.cfg.top_p if sample else None,
            top_k=None,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
        )
        devices = [torch.device(self.device)] if self.device.startswith("cuda") else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                generation_config=gen_cfg,
            )
        completions = []
        for row, ids in enumerate(prompts):
            new = out[row, width:].tolist()
            finished = False
            for pos, tok in enumerate(new):
                if tok in self.stop_ids:
                    new, finished = new[: pos + 1], True
                    break
            text_ids = new[:-1] if finished else new
            text = self.tokenizer.decode(text_ids, skip_special_tokens=True).strip()
            completions.append(Completion(text, len(ids), len(new), finished))
        return completions


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn: the chat template's end marker (if it is one token) and EOS."""
    ids: list[int] = []
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.append(tid)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the tokenizer has neither a chat end token nor an EOS token: generation could not stop")
    return ids


@contextlib.contextmanager
def _progress(total: int, desc: str, enabled: bool) -> Iterator[Any]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="row", disable=not enabled, mininterval=2.0)
    try:
        yield bar
    finally:
        bar.close()
