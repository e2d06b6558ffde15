"""The `openai` engine: any OpenAI-compatible server (vLLM, SGLang, llama.cpp), one or a fleet of them.

Every request goes to `/v1/completions` with the prompt rendered locally by the model's own chat template (the
text the transformers engine sees), so every server gets the same prompt whatever its own template handling, and
runs its local tokens: as token ids where the server takes them, else worded so that the server adds no second BOS
(`in_dialect`).

- Generation: `max_tokens`, `temperature`, `top_p`, `top_k`, a per-row `seed` (`row_seed`), stop at the template's
  end token. Every sampling knob a server might default differently is sent explicitly (llama.cpp defaults to
  top-k 40, min-p 0.05 and a repeat penalty of 1.1).
- Choice scoring: `max_tokens: 1` with the top-k next-token log-probabilities after the "(" prefill. An option
  outside the top k gets the smallest returned log-prob (an upper bound; counted in the stats); a server that
  returns no log-probs is an error, never a silent 0.5.
- The fleet: requests are spread over every URL with at most `max_in_flight` in flight per server (asyncio). A
  timeout, connection error, 429, 5xx, or a 200 whose body is not a completion (a proxy's HTML, a body cut
  short) is retried with exponential backoff, or after the server's `Retry-After`, on whichever server is up; every
  answer ends as a row, a retry or an error (a worker never dies silently).
- A server is down after `SERVER_DOWN_AFTER` failures in a row (or at once when it sends `Retry-After`): it takes no
  requests and is probed at `/v1/models` (0.5 s, then doubling to 10 s) until it lists the served model again. While
  no server is up, requests wait without using up their attempts; after `server.retry_window` seconds with none up,
  or when one request has failed `max_retries + 1` times, or on an answer that is not retryable (400, 401, ...),
  the stage fails with an error naming the servers (stages write nothing before all rows are in, so nothing
  half-written is left).
- The API key comes from the environment variable `server.api_key_env` names; it never appears in params or logs.
- Identity: the served model id each server reports at `/v1/models` (they must agree), with what identifies the
  weights behind it (`server.weights`: the role's model directory's fingerprint or a stated revision), goes into
  every row-cache key, the stats and the rows' provenance as `openai:<id>@<weights>`. A served name alone
  (`openai:<id>`) does not say which weights answer, so such rows are never reused from the row cache.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caiforge import rowcache
from caiforge.engines import (
    OPTIONS,
    Completion,
    EngineError,
    GenerationConfig,
    Message,
    ScoringConfig,
    ServerConfig,
    Shard,
    Stats,
    cache_lookup,
    fill_in,
    identity,
    row_seed,
    serving,
)
from caiforge.engines.rendering import END_TOKENS, ChatRenderer, OptionTokens, added_bos, encode

if TYPE_CHECKING:
    from caiforge.rowcache import RowCache

log = logging.getLogger(__name__)

ENGINE_VERSION = 2
"""Part of every row-cache key: bumped whenever a change to this module (requests, parsing) can change a row."""

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
"""HTTP statuses worth retrying (the server is busy or restarting); any other error status fails at once."""

SERVER_DOWN_AFTER = 3
"""Failed requests in a row (any retryable failure) after which a server is down until a probe finds it up."""


OWNED_BY = {"vllm": "vllm", "sglang": "sglang", "llamacpp": "llama_cpp"}
"""What a server writes in /v1/models `owned_by` -> its dialect: vLLM `owned_by: str = "vllm"`
(vllm/entrypoints/openai/protocol.py ModelCard), SGLang `owned_by: str = "sglang"`
(sglang/srt/entrypoints/openai/protocol.py ModelCard), llama.cpp `"owned_by": "llamacpp"` (tools/server). Any other
(llama-cpp-python says "me") speaks plain `openai`."""


TAKES_TOKEN_IDS = ("sglang", "llama_cpp")
"""Dialects sent the prompt as token ids (the local tokenization, `rendering.encode`), which they run as given:
SGLang's completions turn a list of ints into `input_ids` (serving_completions.py), llama-server a list of numbers
into the prompt's tokens (tools/server `tokenize_input_subprompt`). Sent text, both would add a BOS where the model
asks for one, on top of the chat template's own."""


def in_dialect(
    body: dict, dialect: str, tokenize: Callable[[str], list[int]] | None = None, bos: str | None = None
) -> dict:
    """A request body as `dialect`'s server reads it the way the engine means it, so that every server runs the
    prompt's local tokens (`tokenize`, the engine's tokenizer; `bos`, `rendering.added_bos` of it):

    - sglang, llama_cpp: the prompt as token ids (`TAKES_TOKEN_IDS`); SGLang's `top_k: 0` as -1;
    - vllm: `add_special_tokens: false` (its CompletionRequest defaults to true: a BOS on top of the template's);
    - openai (llama-cpp-python, any other server): text only, which such a server tokenizes by the model's own
      defaults, so a leading `bos` the tokenizer would add again is left for the server to add.
    """
    if dialect == "sglang" and body.get("top_k") == 0:
        # SGLang's SamplingParams.verify: "top_k must be -1 (disable), or at least 1".
        body = {**body, "top_k": -1}
    prompt = body.get("prompt")
    if dialect in TAKES_TOKEN_IDS and tokenize is not None and isinstance(prompt, str):
        body = {**body, "prompt": tokenize(prompt)}
    if dialect == "vllm":
        body = {**body, "add_special_tokens": False}
    if dialect == "openai" and bos and isinstance(prompt, str) and prompt.startswith(bos):
        body = {**body, "prompt": prompt[len(bos) :]}
    return body


class ServerError(EngineError):
    """No server could answer a request: the message names every server and the last error."""


def base_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class Fleet:
    """A list of OpenAI-compatible servers used as one: spread, bounded, retried, failed over."""

    def __init__(self, cfg: ServerConfig, tokenizer: Any = None) -> None:
        self.cfg = cfg
        self.tokenize = (lambda text: encode(tokenizer, text)) if tokenizer is not None else None
        self.bos = added_bos(tokenizer) if tokenizer is not None else None
        """The served model's tokenizer, so that every server runs the local tokens (`in_dialect`)."""
        self.urls = [base_url(u) for u in cfg.urls]
        self.headers = {"Content-Type": "application/json", **serving.auth_headers(cfg)}
        self.model = cfg.model or ""
        self.dialects = {url: cfg.dialect if cfg.dialect != "auto" else "openai" for url in self.urls}
        self.unseen = set(self.urls) if cfg.dialect == "auto" else set()
        """Servers whose /models (their dialect) has not been read yet: read before their first request."""
        self.requests_sent = 0
        self.retries = 0

    def describe(self) -> str:
        return ", ".join(self.urls)

    def learn_dialect(self, url: str, models: Any) -> None:
        """With `dialect: auto`, take `url`'s dialect from the /models answer `models` it just gave: whenever a
        server is seen up, at start or back from down (one that was down at start comes back as what it is)."""
        if self.cfg.dialect != "auto" or not isinstance(models, dict):
            return
        owners = {m.get("owned_by") for m in models.get("data", []) if isinstance(m, dict)}
        self.dialects[url] = next((OWNED_BY[o] for o in owners if o in OWNED_BY), "openai")
        self.unseen.discard(url)

    async def _see(self, session: Any, url: str) -> None:
        """Read the dialect of a server not seen up before (down when the fleet started); raises ConnectionError
        while it does not answer, which the caller retries like a failed request."""
        async with session.get(f"{url}/models") as resp:
            if resp.status != 200:
                raise ConnectionError(f"/models answers HTTP {resp.status}: its dialect is unknown")
            self.learn_dialect(url, await resp.json(content_type=None))

    def served_as(self, url: str) -> str:
        """The model name requests to `url` carry: a managed replica's own name, else the fleet's."""
        return serving.served_name(url) or self.model

    def served_model(self) -> str:
        """The model id every server reports (or `server.model`, checked against their lists)."""
        reported = asyncio.run(self._gather_models())
        ids = {url: [m["id"] for m in body.get("data", [])] for url, body in reported.items()}
        for url, body in reported.items():
            self.learn_dialect(url, body)
        if self.cfg.model:
            missing = [url for url, names in ids.items() if self.served_as(url) not in names]
            if missing:
                raise ServerError(f"server.model {self.cfg.model!r} is not served by {missing}: they list {ids}")
            return self.cfg.model
        firsts = {names[0] if names else "" for names in ids.values()}
        if len(firsts) != 1 or "" in firsts:
            raise ServerError(f"servers disagree on the served model (set server.model): {ids}")
        self.model = firsts.pop()
        return self.model

    async def _gather_models(self) -> dict[str, dict]:
        import aiohttp

        async with aiohttp.ClientSession(headers=self.headers, timeout=self._timeout()) as session:
            out = {}
            for url in self.urls:
                try:
                    async with session.get(f"{url}/models") as resp:
                        if resp.status != 200:
                            raise ServerError(f"{url}/models: HTTP {resp.status}: {(await resp.text())[:200]}")
                        out[url] = await resp.json()
                except (TimeoutError, aiohttp.ClientError) as exc:
                    log.warning("%s: not answering (%s); continuing with the others", url, exc or type(exc).__name__)
            if not out:
                died = [d for url in self.urls if (d := serving.replica_death(url, within=15.0))]
                raise ServerError(f"no server answers at /models: {self.describe()}" + "".join(f"; {d}" for d in died))
            return out

    def _timeout(self) -> Any:
        import aiohttp

        return aiohttp.ClientTimeout(total=self.cfg.timeout)

    def complete(self, payloads: Sequence[dict], on_done: Any = None) -> list[dict]:
        """POST every payload to /completions somewhere in the fleet; the JSON answers, in input order. With
        `on_done(i, answer)`, each answer goes there as it arrives and none is kept (the list comes back empty).
        `payloads[i]` is read when request i is sent, so a lazy sequence keeps one body at a time in memory."""
        if not payloads:
            return []
        return asyncio.run(self._run(payloads, on_done))

    async def _run(self, payloads: Sequence[dict], on_done: Any) -> list[dict]:
        import aiohttp

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        for i in range(len(payloads)):
            queue.put_nowait((i, 0))
        results: list[dict | None] = [None] * len(payloads)  # stays empty when on_done takes the answers
        remaining = len(payloads)
        finished = loop.create_future()
        servers = {url: _Server(url) for url in self.urls}
        last_error: dict[str, str] = {}

        def fail(message: str) -> None:
            if not finished.done():
                finished.set_exception(ServerError(message))

        def guarded(job: Any) -> Any:
            # Whatever goes wrong ends the call as an error: a task that died silently would lose its request
            # and leave the call waiting forever.
            async def run(*args: Any) -> None:
                try:
                    await job(*args)
                except Exception as exc:
                    fail(f"{args[-1].url}: {type(exc).__name__}: {exc}")

            return run

        def requeue(item: tuple[int, int], delay: float) -> None:
            loop.call_later(delay, lambda: finished.done() or queue.put_nowait(item))

        @guarded
        async def serve(session: Any, server: _Server) -> None:
            nonlocal remaining
            url = server.url
            while not finished.done():
                await server.up.wait()
                i, attempt = await queue.get()
                if finished.done():
                    return
                if not server.up.is_set():  # went down while this worker waited for work
                    queue.put_nowait((i, attempt))
                    continue
                model = self.served_as(url)
                body = {"model": model, **payloads[i]} if model else payloads[i]
                retry_after = None
                try:
                    if url in self.unseen:
                        await self._see(session, url)
                    body = in_dialect(body, self.dialects[url], self.tokenize, self.bos)
                    self.requests_sent += 1
                    async with session.post(f"{url}/completions", json=body) as resp:
                        raw = await resp.read()
                        answer = _completion(raw) if resp.status == 200 else None
                        if answer is not None:
                            server.succeeded()
                            remaining -= 1
                            if not on_done:
                                results[i] = answer
                            else:
                                try:
                                    on_done(i, answer)
                                except Exception as exc:  # e.g. an answer without log-probs: the call fails
                                    if not finished.done():
                                        finished.set_exception(exc)
                                    return
                            if remaining == 0 and not finished.done():
                                finished.set_result(None)
                            continue
                        text = raw.decode("utf-8", errors="replace")
                        retry_after = _retry_after(resp.headers.get("Retry-After"))
                        if resp.status == 200:  # a proxy's or login page's HTML, a body cut short: retried
                            error, retry = f"{url}: HTTP 200 but not a completion: {text[:200]!r}", True
                        else:
                            error, retry = f"{url}: HTTP {resp.status}: {text[:300]}", resp.status in RETRY_STATUS
                except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
                    error, retry = f"{url}: {type(exc).__name__}: {exc or 'timed out'}", True
                last_error[url] = error
                died = serving.replica_death(url)  # a managed replica that exited fails the call now, not in 600 s
                if died:
                    fail(f"request {i} failed: {error}; {died}")
                    return
                if not retry:
                    fail(f"request {i} failed and is not retryable: {error}")
                    return
                if attempt >= self.cfg.max_retries:
                    fail(f"request {i} failed {attempt + 1} times on {self.describe()}; last: {error}")
                    return
                self.retries += 1
                log.warning("%s (attempt %d); retrying", error, attempt + 1)
                if server.failed(retry_after):
                    log.warning("%s: down; probing /models until it answers", url)
                delay = min(0.25 * 2**attempt, 8.0) if retry_after is None else min(retry_after, self.cfg.retry_window)
                requeue((i, attempt + 1), delay)

        @guarded
        async def probe(session: Any, server: _Server) -> None:
            while not finished.done():
                await server.down.wait()
                await asyncio.sleep(server.probe_delay)
                try:
                    async with session.get(f"{server.url}/models") as resp:
                        listed = await resp.json(content_type=None) if resp.status == 200 else None
                except (TimeoutError, aiohttp.ClientError, ConnectionError, ValueError):
                    listed = None
                names = [m.get("id") for m in listed.get("data", [])] if isinstance(listed, dict) else []
                if names and (not self.model or self.served_as(server.url) in names):
                    self.learn_dialect(server.url, listed)
                    log.warning(
                        "%s: answers /models again (%s dialect); back in the fleet",
                        server.url,
                        self.dialects[server.url],
                    )
                    server.back()
                else:
                    server.probe_delay = min(server.probe_delay * 2, PROBE_MAX)

        async def watch() -> None:
            # The call fails once no server has been up for `retry_window` seconds.
            while not finished.done():
                if any(s.up.is_set() for s in servers.values()):
                    await asyncio.sleep(0.2)
                    continue
                since = max(s.down_since or 0.0 for s in servers.values())
                if time.monotonic() - since >= self.cfg.retry_window:
                    fail(
                        f"no server answered for {self.cfg.retry_window:g} s (server.retry_window): "
                        f"{self.describe()}; last errors: {last_error}"
                    )
                    return
                await asyncio.sleep(0.2)

        timeout = self._timeout()
        connector = aiohttp.TCPConnector(limit=0)
        session_args = {"headers": self.headers, "timeout": timeout, "connector": connector}
        async with aiohttp.ClientSession(**session_args) as session:
            tasks = [asyncio.create_task(watch())]
            for server in servers.values():
                tasks.append(asyncio.create_task(probe(session, server)))
                tasks += [asyncio.create_task(serve(session, server)) for _ in range(self.cfg.max_in_flight)]
            try:
                await finished
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        return [r for r in results if r is not None]


PROBE_FIRST = 0.5
"""Seconds before a down server's first /v1/models probe."""
PROBE_MAX = 10.0
"""The longest wait between probes (the wait doubles while a server stays down or keeps failing)."""


class _Server:
    """One server's state in a call: up (its workers take requests) or down (probed until it answers)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.failures = 0
        self.probe_delay = PROBE_FIRST
        self.down_since: float | None = None
        self.up, self.down = asyncio.Event(), asyncio.Event()
        self.up.set()

    def succeeded(self) -> None:
        self.failures = 0
        self.probe_delay = PROBE_FIRST

    def failed(self, retry_after: float | None) -> bool:
        """Count a failure; True when it takes the server down (SERVER_DOWN_AFTER in a row, or a Retry-After)."""
        self.failures += 1
        if not self.up.is_set() or (self.failures < SERVER_DOWN_AFTER and retry_after is None):
            return False
        self.up.clear()
        self.down.set()
        self.down_since = time.monotonic()
        if retry_after is not None:
            self.probe_delay = max(self.probe_delay, retry_after)
        return True

    def back(self) -> None:
        """A probe answered: the server takes requests again, on probation (one failure takes it down again, and
        its probe wait is reset only by a success)."""
        self.failures = SERVER_DOWN_AFTER - 1
        self.down_since = None
        self.down.clear()
        self.up.set()
        self.probe_delay = min(self.probe_delay * 2, PROBE_MAX)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header in its delay-seconds form; None when absent or an HTTP date."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _completion(raw: bytes) -> dict | None:
    """The JSON object of a completion answer, or None when the body is not one (not JSON, not UTF-8, no choices)."""
    import json

    try:
        answer = json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    return answer if isinstance(answer, dict) and isinstance(answer.get("choices"), list) else None


def load_tokenizer(model_dir: str | Path, server: ServerConfig) -> Any:
    """The served model's tokenizer: `server.tokenizer`, else the role's model directory (a link is followed)."""
    from transformers import AutoTokenizer

    from caiforge import models

    path = Path(server.tokenizer) if server.tokenizer else Path(model_dir)
    if (path / models.LINK_FILE).is_file():
        path = models.resolve(path)
    if not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer there (server.tokenizer or the role's model directory)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        raise ValueError(f"{path}: the tokenizer has no chat template; the openai engine renders prompts with it")
    return tokenizer


class Lazy(Sequence):
    """A read-only sequence whose item i is `build(i)`, made when it is read and not kept."""

    def __init__(self, n: int, build: Any) -> None:
        self.n, self.build = n, build

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.build(i)


class _Client:
    """What both OpenAI-side engines share: the tokenizer, the fleet, the identity and the stats."""

    def __init__(
        self,
        tokenizer: Any,
        server: ServerConfig,
        progress: bool,
        weights: str | None = None,
        model_dir: str | Path | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.render_chat = ChatRenderer(tokenizer)
        self.server = server
        self.model_dir = model_dir
        """The role's directory: what managed servers serve once a request needs them (None: never started)."""
        self.fleet = Fleet(server, tokenizer)
        self.progress = progress
        self.stats = Stats()
        # Managed servers start at the first request the row cache cannot answer (plan mode sends none): until
        # then the rows are keyed by the name they will serve under, which serving.serve gives every replica.
        self.unstarted = server.managed.launch != "none" and not server.urls
        model = identity.managed_label(server.managed) if self.unstarted else self.fleet.served_model()
        self.weights = weights
        self.identity = identity.served(model, weights)
        self.stats.engine = {"backend": "openai", "model": model, "servers": len(self.fleet.urls)}
        self.stats.engine["weights"] = weights or "unknown"
        self.stats.engine["dialects"] = ",".join(sorted(set(self.fleet.dialects.values())))
        if weights is None:
            log.warning(
                "%s: nothing identifies the weights served as %r (set server.weights to 'model_dir' or "
                "'revision:<text>'), so its rows are not reused from the row cache",
                self.fleet.describe(),
                model,
            )
        self.cache: RowCache | None = None

    def cached_run(
        self, keys: list[str], payloads: list[dict], parse: Any, desc: str, shard: Shard | None = None
    ) -> list[Any]:
        """The answers of `payloads` as `parse(i, answer)` makes them: from the row cache, else from the servers
        (stored as each answer arrives, so a killed run keeps them). With `shard`, only this process's share runs.
        Rows whose weights nothing identifies are neither looked up nor stored."""
        reuse = self.weights is not None
        found, todo = cache_lookup(self.cache, keys, self.stats, shard, reuse=reuse)
        run = list(todo.values())
        last = [time.perf_counter()]

        def store(j: int, answer: dict) -> None:
            i = run[j]
            found[i] = parse(i, answer)
            now = time.perf_counter()
            # A row's cost is the wait since the answer before it: together they are the call's time.
            seconds, last[0] = now - last[0], now
            if self.cache is not None and reuse:
                self.cache.put([(keys[i], found[i])], seconds=seconds)

        self.run(Lazy(len(run), lambda j: payloads[run[j]]), desc, store)
        return fill_in(found, keys, shard)

    def start(self) -> None:
        """Start this role's managed servers (shared with every engine of the stage on the same directory and
        settings, `serving.serve`) and send the requests to them."""
        if self.model_dir is None:
            raise EngineError("managed servers cannot start without the role's model directory")
        served = serving.serve(self.server, self.model_dir)
        fleet = Fleet(served, self.tokenizer)
        label = identity.managed_label(self.server.managed)
        if fleet.served_model() != label:
            raise ServerError(f"the managed replicas serve {fleet.model!r}, not {label!r}")
        fleet.requests_sent, fleet.retries = self.fleet.requests_sent, self.fleet.retries
        self.fleet, self.unstarted = fleet, False
        self.stats.engine["servers"] = len(fleet.urls)
        self.stats.engine["dialects"] = ",".join(sorted(set(fleet.dialects.values())))

    def run(self, payloads: Sequence[dict], desc: str, on_done: Any = None) -> list[dict]:
        """Every payload's answer, in order; with `on_done(i, answer)`, each goes there as it arrives instead (to
        store it at once) and none is kept. Managed servers start here, when there is something to ask."""
        from caiforge.engines.hf import progress

        if payloads and self.unstarted:
            self.start()

        def done(i: int, answer: dict) -> None:
            bar.update(1)
            if on_done:
                on_done(i, answer)

        with progress(len(payloads), desc, self.progress) as bar:
            t0 = time.perf_counter()
            answers = self.fleet.complete(payloads, on_done=done)
            self.stats.seconds += time.perf_counter() - t0
        self.stats.rows += len(payloads)
        self.stats.engine["requests_sent"] = self.fleet.requests_sent
        self.stats.engine["retries"] = self.fleet.retries
        return answers


class OpenAIGenerator(_Client):
    """Chat generation on OpenAI-compatible servers via /v1/completions."""

    def __init__(
        self, tokenizer: Any, cfg: GenerationConfig, weights: str | None = None, model_dir: str | Path | None = None
    ) -> None:
        super().__init__(tokenizer, cfg.server, cfg.progress, weights, model_dir)
        self.cfg = cfg
        self.stop = [t for t in END_TOKENS if t in tokenizer.get_vocab()] or [tokenizer.eos_token]

    @classmethod
    def from_config(cls, model_dir: str | Path, cfg: GenerationConfig) -> OpenAIGenerator:
        return cls(load_tokenizer(model_dir, cfg.server), cfg, identity.weights(model_dir, cfg.server), model_dir)

    def chat(
        self, conversations: Sequence[Sequence[Message]], *, seed: int, desc: str = "", shard: Shard | None = None
    ) -> list[Completion]:
        conversations = list(conversations)

        def payload(i: int) -> dict:
            text = self.render_chat(conversations[i])
            return self.payload(text, row_seed(seed, text))

        # The keys are hashed up front; the bodies are rendered again as they are sent, so memory stays flat in N.
        keys = [
            rowcache.key({"kind": "chat", "model": self.identity, "version": ENGINE_VERSION, **payload(i)})
            for i in range(len(conversations))
        ]

        def parse(i: int, answer: dict) -> dict:
            choice = answer["choices"][0]
            usage = answer.get("usage") or {}
            prompt = prompt_tokens(answer) or len(encode(self.tokenizer, self.render_chat(conversations[i])))
            done = choice.get("finish_reason") == "stop"
            generated = usage.get("completion_tokens") or len(encode(self.tokenizer, choice["text"])) + int(done)
            self.stats.prompt_tokens += prompt
            self.stats.completion_tokens += int(generated)
            return Completion(choice["text"].strip(), prompt, int(generated), done).as_dict()

        answers = self.cached_run(keys, Lazy(len(keys), payload), parse, desc or "generate", shard)
        return [Completion(**v) if v is not None else None for v in answers]

    def payload(self, prompt: str, seed: int) -> dict:
        c = self.cfg
        return {
            "prompt": prompt,
            "max_tokens": c.max_new_tokens,
            "temperature": c.temperature,
            "top_p": c.top_p if c.temperature > 0 else 1.0,
            "top_k": c.top_k,
            "min_p": 0.0,
            "seed": seed,
            "stop": self.stop,
            # Servers differ in their defaults; none of these may change our samples.
            "repeat_penalty": 1.0,
            "repetition_penalty": 1.0,
            "frequency_penalty": 0.0,
            "presence_penalty": 0.0,
        }


class OpenAIChoiceScorer(_Client):
    """Choice scoring on OpenAI-compatible servers: next-token top-k log-probs after the prefill."""

    GENERATOR: type[OpenAIGenerator] = OpenAIGenerator

    def __init__(
        self, tokenizer: Any, cfg: ScoringConfig, weights: str | None = None, model_dir: str | Path | None = None
    ) -> None:
        super().__init__(tokenizer, cfg.server, cfg.progress, weights, model_dir)
        self.cfg = cfg
        self.options_outside_top_k = 0

    @classmethod
    def from_config(cls, model_dir: str | Path, cfg: ScoringConfig) -> OpenAIChoiceScorer:
        return cls(load_tokenizer(model_dir, cfg.server), cfg, identity.weights(model_dir, cfg.server), model_dir)

    def render(self, conversation: Sequence[Message], prefill: str) -> str:
        return self.render_chat(conversation, prefill)

    def generator(self, cfg: GenerationConfig) -> OpenAIGenerator:
        """A generator on the same servers and weights, e.g. for chain-of-thought reasoning (`cfg`'s decoding)."""
        on_servers = dataclasses.replace(cfg, backend="openai", server=self.cfg.server)
        engine = type(self).GENERATOR(self.tokenizer, on_servers, self.weights, self.model_dir)
        engine.cache = self.cache
        return engine

    def choice_logprobs(
        self,
        conversations: Sequence[Sequence[Message]],
        prefills: Sequence[str],
        options: Sequence[str] = OPTIONS,
    ) -> list[tuple[float, ...]]:
        if len(conversations) != len(prefills):
            raise ValueError(f"{len(conversations)} conversations but {len(prefills)} prefills")
        planner = OptionTokens(self.tokenizer, options)
        names: dict[tuple[tuple[int, ...], ...], list[str]] = {}
        top_k = self.cfg.server.top_logprobs

        def payload(i: int) -> dict:
            text = self.render(conversations[i], prefills[i])
            return {"prompt": text, "max_tokens": 1, "temperature": 0.0, "logprobs": top_k, "seed": 0}

        # Keys and option names come from one render per question; bodies are rendered again as they are sent.
        common = {"kind": "choice", "model": self.identity, "version": ENGINE_VERSION, "options": list(options)}
        keys, wanted = [], []
        for i in range(len(conversations)):
            body = payload(i)
            text = body["prompt"]
            try:
                tokens = planner.single(text)
            except ValueError as err:
                raise ValueError(
                    f"scoring.backend openai reads one next token after the prompt; {err} (use the "
                    "transformers backend)"
                ) from None
            if tokens not in names:
                names[tokens] = [self.tokenizer.decode(list(c)) for c in tokens]
            wanted.append(names[tokens])
            keys.append(rowcache.key({**common, **body}))

        def parse(i: int, answer: dict) -> list[float]:
            names = wanted[i]
            top = _top_logprobs(answer)
            if not top:
                raise ServerError(
                    f"{self.fleet.describe()}: the server returned no log-probs for choice scoring; it must support "
                    "`logprobs` on /v1/completions (vLLM, SGLang and llama.cpp do; `transformers serve` does not)"
                )
            floor = min(top.values())
            values = []
            for name in names:
                if name in top:
                    values.append(float(top[name]))
                else:
                    self.options_outside_top_k += 1
                    values.append(float(floor))
            self.stats.prompt_tokens += prompt_tokens(answer) or len(encode(self.tokenizer, payload(i)["prompt"]))
            return values

        out = [tuple(v) for v in self.cached_run(keys, Lazy(len(keys), payload), parse, "score")]
        self.stats.engine["options_outside_top_k"] = self.options_outside_top_k
        return out


def prompt_tokens(answer: dict) -> int:
    """The prompt's token count as the server reports it in `usage` (0 when it does not)."""
    usage = answer.get("usage")
    count = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return count if isinstance(count, int) and count > 0 else 0


def _top_logprobs(answer: dict) -> dict[str, float]:
    """{token text: log-prob} of the first generated position. Reads the legacy completions form
    (`logprobs.top_logprobs[0]` = {token: log-prob}: vLLM, SGLang, llama-cpp-python) and the chat-style form that
    llama.cpp's `llama-server` returns (`logprobs.content[0].top_logprobs` = [{"token", "logprob"}, ...])."""
    logprobs = (answer.get("choices") or [{}])[0].get("logprobs") or {}
    tops = logprobs.get("top_logprobs") or []
    if tops and tops[0]:
        return dict(tops[0])
    content = logprobs.get("content") or []
    first = (content[0].get("top_logprobs") or []) if content else []
    return {t["token"]: float(t["logprob"]) for t in first if "token" in t and "logprob" in t}
