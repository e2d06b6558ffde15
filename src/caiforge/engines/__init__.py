"""The engines that generate and score text, behind one interface.

Stages ask for two things and never learn which engine answers:

- `Generator.chat(conversations, seed=...)`: one `Completion` per chat conversation, in order;
- `ChoiceScorer.choice_logprobs(conversations, prefills)`: the log-probabilities of the option letters ("A", "B")
  as the next token after the pre-filled start of the assistant turn (the AI-feedback labeller's question).

The engine is picked per role by params (`generation.backend`, `scoring.backend`):

- `transformers` (`caiforge.engines.hf`): a local Hugging Face model, batched, with the shared few-shot prefix's KV
  cache computed once per call; bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere;
- `openai` (`caiforge.engines.openai`): any OpenAI-compatible server (vLLM, SGLang, llama.cpp's server), one or a
  fleet behind a list of URLs, with the prompt rendered locally by the model's own chat template.

Sampling is reproducible per row: every row gets its own seed derived from the call's seed and the row's rendered
prompt (`row_seed`), so a row's sampled text does not depend on which other rows share its call or batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from caiforge import distributed
from caiforge.config import StageError
from caiforge.engines.serving import ManagedConfig

if TYPE_CHECKING:
    from caiforge.rowcache import RowCache

Message = dict[str, str]
"""A chat turn: {"role": "system" | "user" | "assistant", "content": text}."""

OPTIONS = ("A", "B")
"""Option letters of a two-way comparison, in slot order."""

Backend = Literal["transformers", "openai"]


class EngineError(StageError):
    """An engine could not answer (e.g. no server reachable); stages exit with its message, no traceback."""


@dataclass(frozen=True)
class ServerConfig:
    """Where the `openai` backend sends requests (ignored by `transformers`)."""

    urls: tuple[str, ...] = ()
    """Base URLs of OpenAI-compatible servers, e.g. http://10.0.0.5:8000/v1; requests are spread over all of them."""
    model: str | None = None
    """Served model name (vLLM's --served-model-name); null: the one model the servers list at /v1/models."""
    weights: str | None = None
    """What identifies the weights behind the served name, for the row cache and provenance: `model_dir` (the
    servers serve the role's model directory, as dvc.yaml declares it: rows are keyed by its fingerprint, so
    retrained weights get new rows), `revision:<text>` (a revision you state and change with the weights), or null
    (nothing does: rows are never reused from the row cache, and a warning says so)."""
    tokenizer: str | None = None
    """Local directory with the served model's tokenizer and chat template (declare it as a dep in dvc.yaml);
    null: the stage's model directory for this role."""
    api_key_env: str | None = None
    """Name of the environment variable that holds the API key (the key itself never goes in params)."""
    max_in_flight: int = 8
    """Concurrent requests per server."""
    timeout: float = 300.0
    """Seconds before a request counts as failed (and is retried, on any server)."""
    max_retries: int = 6
    """Failed attempts per request beyond the first (timeouts, connection errors, 429, 5xx, a 200 that is not a
    completion) before the stage fails. Requests wait, without using attempts up, while no server is up."""
    retry_window: float = 600.0
    """Seconds the fleet waits with no server up (each down server is probed at /v1/models) before the stage fails;
    the default outlasts a vLLM restart."""
    top_logprobs: int = 5
    """How many next-token log-probabilities choice scoring asks for (the options must be among them)."""
    dialect: Literal["auto", "vllm", "sglang", "llama_cpp", "openai"] = "auto"
    """How requests are worded where servers differ (`caiforge.engines.openai.DIALECTS`); auto: what each server
    names itself in /v1/models `owned_by` (set it when a proxy hides that)."""
    managed: ManagedConfig = field(default_factory=ManagedConfig)
    """Servers the stage starts itself on the role's model directory and stops when it ends (`launch`, see
    `caiforge.engines.serving`), instead of `urls` someone else runs."""

    def __post_init__(self) -> None:
        if self.max_in_flight < 1 or self.max_retries < 0 or self.timeout <= 0 or self.top_logprobs < 2:
            raise ValueError("server: max_in_flight >= 1, max_retries >= 0, timeout > 0 and top_logprobs >= 2")
        if self.retry_window <= 0:
            raise ValueError(f"server.retry_window must be > 0 seconds, got {self.retry_window}")
        bad = [u for u in self.urls if not u.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"server.urls: not an http(s) URL: {bad[0]!r}")
        if self.weights is not None and self.weights != "model_dir" and not self.weights.startswith("revision:"):
            raise ValueError(f"server.weights: expected null, 'model_dir' or 'revision:<text>', got {self.weights!r}")
        if self.weights == "revision:":
            raise ValueError("server.weights: 'revision:' needs the revision after the colon")
        from caiforge.engines import serving

        if not serving.serves_model_dir(self.managed) and not (self.weights or "").startswith("revision:"):
            raise ValueError(
                f"server.managed.command {self.managed.command!r} serves neither {{model}} nor {{gguf}}: state what "
                "it serves with server.weights: 'revision:<text>' (change the text when the weights change), or its "
                "rows could come back for other weights"
            )
        if self.urls and self.managed.launch != "none":
            raise ValueError(
                "server: both server.urls and server.managed.launch are set; the stage either starts its "
                "own servers or uses yours"
            )


@dataclass(frozen=True)
class EngineConfig:
    """What every engine role shares: which engine, where it runs, and the servers when it runs on them."""

    backend: Backend = "transformers"
    """Which engine runs the model: a local `transformers` model or `openai`-compatible servers."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when available, else CPU (transformers)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: bfloat16 on CUDA and on CPUs with native bf16 (AMX / AVX512-BF16), float32 elsewhere (scores are
    always read in float32)."""
    prefix_reuse: bool = True
    """Compute the KV cache of the prompt prefix that every row of a call shares once (transformers)."""
    batching: Literal["exact", "dynamic"] = "dynamic"
    """transformers: `exact` runs every batch in a shape fixed by its row alone (full batches with filler rows, one
    batch per width, finished rows decoded to the batch's end), so a row's bytes never depend on its neighbours;
    `dynamic` batches the real rows only, longest first, and drops rows as they finish: a row then equals its
    `exact` self up to floating point (README, "Batching")."""
    progress: bool = True
    """Show a progress bar (rows, tokens/s) on stderr."""
    server: ServerConfig = field(default_factory=ServerConfig)
    """The servers, when backend is `openai`."""

    def __post_init__(self) -> None:
        if self.backend == "openai" and not self.server.urls and self.server.managed.launch == "none":
            raise ValueError(
                "backend is 'openai' but server.urls is empty: list at least one server, or set server.managed.launch"
            )


@dataclass(frozen=True)
class GenerationConfig(EngineConfig):
    """How to generate; every stage that generates has one of these in its params section."""

    batch_size: int = 16
    """Conversations per forward batch (transformers; grouped by length)."""
    max_new_tokens: int = 128
    """Cap on generated tokens per conversation; a row that hits it is marked unfinished."""
    temperature: float = 0.0
    """0 means greedy decoding; > 0 samples."""
    top_p: float = 1.0
    """Nucleus sampling mass (used only when temperature > 0)."""
    top_k: int = 0
    """Sample only from the k most likely tokens; 0 = no top-k cut (set explicitly: engines default to 40 or 50)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"batch_size and max_new_tokens must be >= 1, got {self.batch_size}, {self.max_new_tokens}"
            )
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(
                f"temperature must be >= 0, top_p in (0, 1] and top_k >= 0, got {self.temperature}, {self.top_p}, "
                f"{self.top_k}"
            )


def decoding_only(cfg: GenerationConfig, where: str) -> None:
    """Check that `cfg` sets decoding only: a generator made by `ChoiceScorer.generator` runs on the scorer's own
    engine (backend, device, dtype and servers), so those keys may not be set where it is configured."""
    base = EngineConfig()
    for name in ("backend", "device", "dtype", "server"):
        if getattr(cfg, name) != getattr(base, name):
            raise ValueError(
                f"{where}.{name}: this generation runs on the scoring model's engine; set {name} in its scoring config"
            )


@dataclass(frozen=True)
class ScoringConfig(EngineConfig):
    """How to run a scoring model."""

    batch_size: int = 8
    """Sequences per forward pass (transformers; grouped by length, left-padded)."""
    batching: Literal["exact", "dynamic"] = "exact"
    """As for generation; `exact` by default, since scores are written as numbers: a row-level rebuild then writes
    the bytes of a fresh build."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Stats:
    """Running totals a stage copies into its metrics, with what ran them."""

    rows: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    prefix_tokens_reused: int = 0
    """Prompt tokens not recomputed because their KV cache was shared (transformers prefix reuse)."""
    decode_slots: int = 0
    """Row positions the model computed while generating: one per row per decoding step, filler rows and rows that
    had already finished included (transformers); `completion_tokens` of them were kept."""
    cache_hits: int = 0
    """Requests answered from the row cache (not counted in `rows`, which counts requests the engine ran)."""
    cached_completion_tokens: int = 0
    """Generated tokens of the answers taken from the row cache (what they cost the build that made them)."""
    cached_seconds: float = 0.0
    """Engine seconds the answers taken from the row cache cost the builds that made them."""
    unpriced_cache_hits: int = 0
    """Answers taken from the row cache with no recorded cost (made before costs were recorded)."""
    engine: dict[str, str | int] = field(default_factory=dict)
    """backend, model identity, device and dtype."""

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else 0.0

    @property
    def wasted_slot_share(self) -> float:
        """The share of `decode_slots` whose token was thrown away (filler rows, rows already finished)."""
        return 1 - self.completion_tokens / self.decode_slots if self.decode_slots else 0.0

    def as_dict(self) -> dict:
        return {
            "rows": self.rows,
            "prompt_tokens": self.prompt_tokens,
            "prefix_tokens_reused": self.prefix_tokens_reused,
            "cache_hits": self.cache_hits,
            "cached_completion_tokens": self.cached_completion_tokens,
            "cached_seconds": round(self.cached_seconds, 3),
            "unpriced_cache_hits": self.unpriced_cache_hits,
            "completion_tokens": self.completion_tokens,
            "decode_slots": self.decode_slots,
            "wasted_slot_share": round(self.wasted_slot_share, 4),
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 2),
            **self.engine,
        }


class Generator(Protocol):
    """What stages call. `seed` makes sampling reproducible (per row, see `row_seed`); `desc` labels the bar."""

    stats: Stats
    identity: str
    """The model behind the engine, for provenance: a weights fingerprint, or `openai:<served model id>`."""
    cache: RowCache | None
    """Where answers are looked up before running and stored as they finish (None: no cache)."""

    def chat(
        self, conversations: Sequence[Sequence[Message]], *, seed: int, desc: str = "", shard: Shard | None = None
    ) -> list[Completion]:
        """With `shard`, this process runs only its share of the requests and the other rows come back None
        (`chat_shared` gathers every process's share)."""
        ...


class ChoiceScorer(Protocol):
    """What the labeller calls: one tuple of option log-probs per (conversation, prefill), in input order."""

    stats: Stats
    identity: str
    cache: RowCache | None

    def generator(self, cfg: GenerationConfig) -> Generator:
        """A generator on the same model (weights or servers), e.g. for chain-of-thought reasoning: `cfg`'s
        decoding settings on this scorer's backend, device, dtype and servers."""
        ...

    def choice_logprobs(
        self,
        conversations: Sequence[Sequence[Message]],
        prefills: Sequence[str],
        options: Sequence[str] = OPTIONS,
    ) -> list[tuple[float, ...]]: ...


def row_seed(seed: int, prompt: str) -> int:
    """A row's own sampling seed: from the call's seed and the row's rendered prompt, never from its batch.

    31 bits, so that every server accepts it as a request seed.
    """
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass(frozen=True)
class Shard:
    """One process's share of a call under several processes (`accelerate launch`): distinct request number k (in
    row order) is this process's when k % count is its index, and it runs it unless its row cache holds it. Numbered
    among all requests, cached or not, so processes whose caches differ (one opened it after another had added
    rows) still share every request out: each request is cached somewhere or run by its owner. A row's answer does
    not depend on which process runs it (`row_seed`; with `batching: exact` not even on its batch, bit for bit),
    so gathering the shares gives the answers one process gives (up to floating point with `dynamic`)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index must be in [0, {self.count}), got {self.index}")

    def owns(self, k: int) -> bool:
        return k % self.count == self.index


def cache_lookup(
    cache: RowCache | None, keys: Sequence[str], stats: Stats, shard: Shard | None = None, reuse: bool = True
) -> tuple[list[Any], dict[str, int]]:
    """(cached value or None per row, {key: first row} of the distinct requests still to run here).

    Rows with equal keys are one request: it is looked up or run once, and every such row gets its answer
    (`fill_in`); hits and runs are counted per distinct request. With `shard`, only this process's share of the
    requests to run is returned. With `reuse` False nothing is taken from the cache (every request runs).
    """
    found: list[Any] = [None] * len(keys)
    todo: dict[str, int] = {}
    seen: set[str] = set()
    for i, k in enumerate(keys):
        if k in seen:
            continue
        number = len(seen)
        seen.add(k)
        value = cache.get(k) if cache is not None and reuse else None
        if cache is not None and not reuse:
            cache.skip(k)
        if value is None:
            if shard is None or shard.owns(number):
                todo[k] = i
        else:
            found[i] = value
            stats.cache_hits += 1
            cost = cache.cost(k) if cache is not None else None
            if cost is None:
                stats.unpriced_cache_hits += 1
            else:
                stats.cached_seconds += cost
            if isinstance(value, dict):
                stats.cached_completion_tokens += int(value.get("completion_tokens", 0))
    return found, todo


def fill_in(found: list[Any], keys: Sequence[str], shard: Shard | None = None) -> list[Any]:
    """Every row's answer: duplicate rows get the answer of the first row with their key. With `shard`, rows another
    process runs are None."""
    by_key = {k: v for k, v in zip(keys, found, strict=True) if v is not None}
    return [by_key.get(k) for k in keys] if shard is not None else [by_key[k] for k in keys]


def make_generator(model_dir: str | Path, cfg: GenerationConfig, cache: RowCache | None = None) -> Generator:
    """The engine `cfg.backend` names, serving the model in `model_dir` (for `openai`: its tokenizer)."""
    from caiforge import planmode

    engine: Generator
    if planmode.active():
        from caiforge.engines import plan

        return plan.engine("generator", model_dir, cfg, cache)
    if cfg.backend == "transformers":
        from caiforge.engines import hf

        engine = hf.TransformersGenerator.from_dir(model_dir, cfg)
    elif cfg.backend == "openai":
        from caiforge.engines import openai

        engine = openai.OpenAIGenerator.from_config(model_dir, cfg)  # managed servers start at the first request
    else:
        raise ValueError(f"generation.backend: unknown backend {cfg.backend!r}")
    engine.cache = cache
    return engine


def chat_shared(
    gen: Generator, conversations: Sequence[Sequence[Message]], *, seed: int, desc: str = ""
) -> list[Completion]:
    """`gen.chat`, split over every process of the run (`accelerate launch`): each runs its `Shard`, and every
    process gets all answers in row order. Every process must call it with the same conversations."""
    size = distributed.world_size()
    if size == 1:
        return gen.chat(conversations, seed=seed, desc=desc)
    mine = gen.chat(conversations, seed=seed, desc=desc, shard=Shard(distributed.rank(), size))
    answers: dict[int, Completion] = {}
    for i, completion in distributed.gather([(i, c) for i, c in enumerate(mine) if c is not None]):
        answers.setdefault(i, completion)  # rows from the row cache come back from every process
    missing = [i for i in range(len(conversations)) if i not in answers]
    if missing:
        raise RuntimeError(f"rows {missing[:5]} were answered by no process (did the processes ask different rows?)")
    return [answers[i] for i in range(len(conversations))]


def stage_answers(
    model_dir: str | Path,
    cfg: GenerationConfig,
    conversations: Sequence[Sequence[Message]],
    *,
    seed: int,
    cache: RowCache | None = None,
    desc: str = "",
) -> tuple[list[Completion], dict[str, Any] | None]:
    """The answers of `model_dir` to `conversations` for a stage that may run as several processes (a training
    stage under `accelerate launch`), and the stats of the engine that made them, on every process in row order.
    Every process must call it with the same arguments. Engines are released before it returns, so training gets
    every GPU:

    - managed servers: the main process alone makes the engine and starts one fleet for the whole run, placed on
      its node's GPUs before any process has loaded a model; it asks every row (`cache` first) and stops the
      servers, while the others wait for the answers (`distributed.on_main`, their stats None);
    - otherwise every process answers its share (`chat_shared`) through its own engine and `cache`."""
    from caiforge.engines import serving

    def ask(shared: bool) -> tuple[list[Completion], dict[str, Any]]:
        gen = make_generator(model_dir, cfg, cache)
        try:
            outs = (chat_shared if shared else type(gen).chat)(gen, conversations, seed=seed, desc=desc)
            return outs, gen.stats.as_dict()
        finally:
            serving.release(model_dir)

    if cfg.backend == "openai" and cfg.server.managed.launch != "none":
        outs, stats = distributed.on_main(lambda: ask(shared=False))
        return outs, stats if distributed.rank() == 0 else None
    return ask(shared=True)


def make_choice_scorer(model_dir: str | Path, cfg: ScoringConfig, cache: RowCache | None = None) -> ChoiceScorer:
    """The choice scorer `cfg.backend` names, serving the model in `model_dir` (for `openai`: its tokenizer)."""
    from caiforge import planmode

    scorer: ChoiceScorer
    if planmode.active():
        from caiforge.engines import plan

        return plan.engine("scorer", model_dir, cfg, cache)
    if cfg.backend == "transformers":
        from caiforge.engines import hf

        scorer = hf.TransformersChoiceScorer.from_dir(model_dir, cfg)
    elif cfg.backend == "openai":
        from caiforge.engines import openai

        scorer = openai.OpenAIChoiceScorer.from_config(model_dir, cfg)  # managed servers start at the first request
    else:
        raise ValueError(f"scoring.backend: unknown backend {cfg.backend!r}")
    scorer.cache = cache
    return scorer
