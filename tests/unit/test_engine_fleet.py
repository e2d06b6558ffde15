"""The openai engine's fleet logic against a scripted HTTP server on 127.0.0.1: which failures are retried, when
it gives up, and what a server without log-probs gets. (The real-server path is tests/unit/test_engine_openai.py
and tests/stages/test_server_backend.py, against llama.cpp.)"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import pytest

from caiforge import engines
from caiforge.engines import openai
from tests import servers


class Scripted:
    """An OpenAI-shaped HTTP server whose /v1/completions answers with the statuses in `script` (bytes: a 200 with
    that body), then 200."""

    def __init__(
        self, script: list, logprobs: bool = True, port: int | None = None, delay: float = 0.0, owned_by: str = "me"
    ) -> None:
        self.script, self.logprobs, self.seen, self.probes, self.delay = list(script), logprobs, 0, 0, delay
        self.owned_by, self.bodies = owned_by, []
        self.port = port or servers.free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.sent_at: list[float] = []

    async def completions(self, request):
        from aiohttp import web

        body = await request.json()
        self.bodies.append(body)
        self.seen += 1
        if self.owned_by == "sglang" and (body.get("top_k", -1) < -1 or body.get("top_k") == 0):
            # sglang/srt/sampling/sampling_params.py, SamplingParams.verify
            message = f"top_k must be -1 (disable), or at least 1, got {body['top_k']}."
            return web.json_response({"error": message}, status=400)
        self.sent_at.append(time.monotonic())
        if self.script:
            step = self.script.pop(0)
            if isinstance(step, bytes):  # a 200 whose body is not a completion
                return web.Response(body=step, status=200, content_type="text/html")
            status, headers = step if isinstance(step, tuple) else (step, {})
            return web.json_response({"error": "scripted"}, status=status, headers=headers)
        await asyncio.sleep(self.delay)
        top = [{"(": -3.0, "A": -0.5, "B": -1.5}] if self.logprobs else None
        choice = {"text": f"echo {body['prompt'][-5:]}", "finish_reason": "stop", "logprobs": None}
        if top:
            choice["logprobs"] = {"top_logprobs": top}
        return web.json_response({"choices": [choice], "usage": {"completion_tokens": 3}})

    async def models(self, request):
        from aiohttp import web

        self.probes += 1
        return web.json_response({"data": [{"id": "scripted-model", "owned_by": self.owned_by}]})

    def serve(self) -> Iterator[Scripted]:
        from aiohttp import web

        loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=5)
            loop.run_until_complete(runner.cleanup())
            loop.close()


@pytest.fixture
def scripted(request):
    script, logprobs = request.param if isinstance(request.param, tuple) else (request.param, True)
    yield from Scripted(script, logprobs).serve()


def fleet(*urls: str, **kw) -> openai.Fleet:
    return openai.Fleet(engines.ServerConfig(urls=urls, max_in_flight=1, **kw))


@pytest.mark.parametrize("scripted", [[503, 429, 502]], indirect=True)
def test_busy_answers_are_retried(scripted):
    f = fleet(scripted.url)
    answers = f.complete([{"prompt": "one"}, {"prompt": "two"}])
    assert [a["choices"][0]["text"] for a in answers] == ["echo one", "echo two"], "input order kept"
    assert f.retries == 3 and scripted.seen == 5


@pytest.mark.parametrize("scripted", [[400]], indirect=True)
def test_a_client_error_is_not_retried(scripted):
    with pytest.raises(openai.ServerError, match="not retryable.*HTTP 400"):
        fleet(scripted.url).complete([{"prompt": "x"}])
    assert scripted.seen == 1


@pytest.mark.parametrize("scripted", [[503] * 10], indirect=True)
def test_retries_are_bounded(scripted):
    with pytest.raises(openai.ServerError, match="failed 3 times"):
        fleet(scripted.url, max_retries=2).complete([{"prompt": "x"}])


@pytest.mark.parametrize("scripted", [[]], indirect=True)
def test_requests_move_off_a_dead_server(scripted):
    dead = f"http://127.0.0.1:{servers.free_port()}/v1"
    f = fleet(dead, scripted.url)
    answers = f.complete([{"prompt": f"p{i}"} for i in range(6)])
    assert len(answers) == 6 and scripted.seen == 6 and f.retries >= 1


@pytest.mark.parametrize("scripted", [[]], indirect=True)
def test_bodies_are_read_as_they_are_sent_and_answers_handed_over_are_not_kept(scripted):
    built, answered = [], []

    def body(i: int) -> dict:
        built.append((i, len(answered)))  # which body, and how many answers had arrived when it was read
        return {"prompt": f"p{i}"}

    kept = fleet(scripted.url).complete(openai.Lazy(4, body), on_done=lambda i, a: answered.append(i))
    assert kept == [] and answered == [0, 1, 2, 3]
    # One request in flight: body i is built only once answer i-1 is in, never all of them up front.
    assert built == [(0, 0), (1, 1), (2, 2), (3, 3)]
    with pytest.raises(IndexError):
        openai.Lazy(4, body)[4]


@pytest.mark.parametrize("scripted", [([], False)], indirect=True)
def test_choice_scoring_without_logprobs_is_an_error(scripted, tiny_model_dir):
    cfg = engines.ScoringConfig(backend="openai", server=engines.ServerConfig(urls=(scripted.url,)), progress=False)
    scorer = engines.make_choice_scorer(tiny_model_dir, cfg)
    assert scorer.identity == "openai:scripted-model"
    with pytest.raises(openai.ServerError, match="no log-probs"):
        scorer.choice_logprobs([[{"role": "user", "content": "A or B?"}]], ["The answer is: ("])


@pytest.mark.parametrize("scripted", [[]], indirect=True)
def test_choice_scoring_reads_the_option_letters(scripted, tiny_model_dir):
    cfg = engines.ScoringConfig(backend="openai", server=engines.ServerConfig(urls=(scripted.url,)), progress=False)
    scorer = engines.make_choice_scorer(tiny_model_dir, cfg)
    assert scorer.choice_logprobs([[{"role": "user", "content": "A or B?"}]], ["The answer is: ("]) == [(-0.5, -1.5)]


@pytest.mark.parametrize("scripted", [[]], indirect=True)
def test_evaluate_names_each_model_on_shared_servers(scripted, tiny_model_dir):
    """evaluate's answers from servers: each model's requests carry its name, and a model the servers do not list
    is an error naming it (never answers from whatever model happens to be served)."""
    from tests.conftest import load_stage

    evaluate = load_stage("evaluate")
    cfg = engines.GenerationConfig(backend="openai", server=engines.ServerConfig(urls=(scripted.url,)))
    with pytest.raises(openai.ServerError, match="'sft' is not served"):
        engines.make_generator(tiny_model_dir, evaluate.model_generation(cfg, "sft"))
    served = engines.make_generator(tiny_model_dir, evaluate.model_generation(cfg, "scripted-model"))
    assert served.identity == "openai:scripted-model"
    local = engines.GenerationConfig()
    assert evaluate.model_generation(local, "sft") is local


NOT_COMPLETIONS = [b"<html><body>Please log in</body></html>", b'{"choices": [{"te', b"\xff\xfe\x00garbage"]


@pytest.mark.parametrize("scripted", [NOT_COMPLETIONS], indirect=True)
def test_a_200_that_is_not_a_completion_is_retried(scripted):
    """A login page, a truncated body or undecodable bytes with status 200 are retried, never a lost request."""
    f = fleet(scripted.url)
    assert [a["choices"][0]["text"] for a in call_within(f, [{"prompt": "one"}], 30)] == ["echo one"]
    assert f.retries == 3 and scripted.seen == 4


@pytest.mark.parametrize("scripted", [[NOT_COMPLETIONS[0]] * 10], indirect=True)
def test_a_server_that_only_answers_html_fails_the_call_naming_it(scripted):
    with pytest.raises(openai.ServerError, match="HTTP 200 but not a completion.*log in"):
        call_within(fleet(scripted.url, max_retries=2), [{"prompt": "x"}, {"prompt": "y"}], 30)


def call_within(f: openai.Fleet, payloads: list[dict], seconds: float) -> list[dict]:
    """`f.complete(payloads)` in a thread, failing the test instead of hanging when it does not return in time."""
    out: dict = {}

    def run() -> None:
        try:
            out["answers"] = f.complete(payloads)
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the call hung for {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["answers"]


@pytest.mark.parametrize("scripted", [[]], indirect=True)
def test_server_rows_are_new_when_the_engine_code_changes(scripted, tiny_model_dir, tmp_path, monkeypatch):
    """Rows cached by an older version of the openai engine's requests or parsing are asked again."""
    from caiforge import rowcache

    cfg = engines.GenerationConfig(
        backend="openai", server=engines.ServerConfig(urls=(scripted.url,), weights="revision:r1"), progress=False
    )
    convs = [[{"role": "user", "content": "hello"}]]
    for version, sent in [(openai.ENGINE_VERSION, 1), (openai.ENGINE_VERSION, 1), (openai.ENGINE_VERSION + 1, 2)]:
        monkeypatch.setattr(openai, "ENGINE_VERSION", version)
        gen = engines.make_generator(tiny_model_dir, cfg, rowcache.RowCache(tmp_path))
        gen.chat(convs, seed=0)
        gen.cache.close()
        assert scripted.seen == sent


def test_a_server_failing_everything_beside_a_healthy_one_does_not_fail_the_call():
    """A server that answers 503 to every completion (its /models still answers) goes down after a few failures,
    comes back only through a /models probe, on probation, and goes down again at its next failure: the healthy
    server answers every request, and the failing one costs a request per probe, not per request."""
    bad = Scripted([503] * 10_000)
    good = Scripted([], delay=0.03)
    with contextlib.ExitStack() as stack:
        for server in (bad, good):
            stack.enter_context(contextlib.contextmanager(server.serve)())
        f = fleet(bad.url, good.url, max_retries=6)
        answers = call_within(f, [{"prompt": f"p{i}"} for i in range(100)], 60)
    assert [a["choices"][0]["text"] for a in answers] == [f"echo p{i}" for i in range(100)]
    assert good.seen == 100 and bad.probes >= 2, "the call outlasted several probes"
    assert bad.seen <= openai.SERVER_DOWN_AFTER + bad.probes, "after going down, one request per probe"


def test_a_server_refusing_connections_for_a_while_is_ridden_out():
    """The only server refuses connections for 2 s (a restart): requests wait, without using up their attempts,
    until a probe finds it up, and the call completes."""
    port = servers.free_port()
    late = Scripted([], port=port)
    f = fleet(late.url, max_retries=2, retry_window=30)
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(answers=f.complete([{"prompt": f"p{i}"} for i in range(8)])))
    started = time.monotonic()
    thread.start()
    time.sleep(2.0)
    with contextlib.contextmanager(late.serve)():
        thread.join(30)
        assert not thread.is_alive(), "the call hung"
    assert len(out["answers"]) == 8 and late.probes >= 1 and time.monotonic() - started >= 2.0


def test_no_server_up_for_the_retry_window_fails_the_call_naming_it():
    dead = f"http://127.0.0.1:{servers.free_port()}/v1"
    started = time.monotonic()
    with pytest.raises(openai.ServerError, match=rf"no server answered for 2 s.*{dead}"):
        call_within(fleet(dead, max_retries=100, retry_window=2), [{"prompt": "x"}], 30)
    assert 2.0 <= time.monotonic() - started < 10.0


@pytest.mark.parametrize("scripted", [[(503, {"Retry-After": "2"})]], indirect=True)
def test_retry_after_is_honoured(scripted):
    f = fleet(scripted.url)
    assert len(call_within(f, [{"prompt": "x"}], 30)) == 1
    assert scripted.seen == 2 and scripted.sent_at[1] - scripted.sent_at[0] >= 2.0, "asked again after 2 s, not 0.25"


def test_each_server_gets_the_request_in_its_own_dialect(tiny_model_dir):
    """Servers that read a field differently get it worded for them, named by what /v1/models says they are:
    SGLang rejects `top_k: 0` (its "off" is -1), vLLM adds a BOS unless told not to; a plain server gets the
    request as the engine means it. One fleet may mix them."""
    fleet_of = {"sglang": Scripted([], owned_by="sglang"), "vllm": Scripted([], owned_by="vllm"), "me": Scripted([])}
    with contextlib.ExitStack() as stack:
        for server in fleet_of.values():
            stack.enter_context(contextlib.contextmanager(server.serve)())
        urls = tuple(s.url for s in fleet_of.values())
        cfg = engines.GenerationConfig(
            backend="openai", server=engines.ServerConfig(urls=urls), temperature=0.7, top_k=0, progress=False
        )
        gen = engines.make_generator(tiny_model_dir, cfg)
        assert gen.fleet.dialects == dict(zip(urls, ("sglang", "vllm", "openai"), strict=True))
        assert gen.stats.engine["dialects"] == "openai,sglang,vllm"
        convs = [[{"role": "user", "content": f"question {i}"}] for i in range(30)]
        assert len(gen.chat(convs, seed=0)) == 30
    sglang, vllm, plain = (fleet_of[k].bodies for k in ("sglang", "vllm", "me"))
    assert sglang and vllm and plain, "every server answered some requests"
    assert {b["top_k"] for b in sglang} == {-1} and {b["top_k"] for b in vllm + plain} == {0}
    assert all(b["add_special_tokens"] is False for b in vllm)
    assert not any("add_special_tokens" in b for b in sglang + plain)
    forced = engines.ServerConfig(urls=urls, dialect="vllm")
    assert set(openai.Fleet(forced).dialects.values()) == {"vllm"}, "a proxy that hides owned_by: set it"
