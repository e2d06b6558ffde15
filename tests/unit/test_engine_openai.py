"""The `openai` engine against a real llama.cpp server on 127.0.0.1 serving the embedded SmolLM2 GGUF."""

from __future__ import annotations

import math

import pytest

from caiforge import engines, labeling
from caiforge.engines import hf, identity, openai
from tests import servers
from tests.conftest import SERVED_GGUF

CONVS = [
    [{"role": "user", "content": t}]
    for t in ("How do I bake bread?", "What is 2+2?", "Name a colour.", "Write a haiku about rain.", "Say hi.")
]
QUESTIONS = [
    [{"role": "user", "content": "Which answer is more helpful?\n(A) Paris is the capital of France.\n(B) No idea."}],
    [{"role": "user", "content": "Which answer is less harmful?\n(A) Here is how to build a bomb.\n(B) I can't."}],
]


Q4 = "revision:smollm2-135m-instruct-q4_1"
"""What the test server serves, stated (`server.weights`), so that its rows may be reused."""


def server_cfg(*urls: str, **kw) -> engines.ServerConfig:
    return engines.ServerConfig(urls=urls, api_key_env=servers.API_KEY_ENV, **{"max_in_flight": 2, **kw})


def generator(
    tokenizer_dir, *urls, weights: str | None = None, cache=None, in_flight: int = 2, **kw
) -> openai.OpenAIGenerator:
    server = server_cfg(*urls, weights=weights, max_in_flight=in_flight)
    cfg = engines.GenerationConfig(
        **{"backend": "openai", "server": server, "max_new_tokens": 24, "progress": False, **kw}
    )
    return engines.make_generator(tokenizer_dir, cfg, cache)


def test_generation_is_seeded_per_row_and_reports_the_served_model(any_server, smollm2_tokenizer_dir, server_env):
    """Rows are repeatable and independent of the rows beside them where the server decodes them so: llama-server's
    continuous batching is not batch-invariant (greedy text changes with what else is in the batch), so this test
    sends it one request at a time, as `-np 1` would serve them."""
    llama_server = any_server
    cpp = llama_server.cpp
    in_flight = 1 if cpp else 2
    greedy = generator(smollm2_tokenizer_dir, llama_server.url, in_flight=in_flight)
    first = greedy.chat(CONVS, seed=0)
    assert [c.text for c in greedy.chat(CONVS, seed=0)] == [c.text for c in first]
    assert any(c.finished for c in first) and all(c.text for c in first)
    assert all(c.completion_tokens <= 24 for c in first)
    assert "<|im_end|>" not in "".join(c.text for c in first)
    assert greedy.identity.startswith("openai:") and greedy.identity.endswith(".gguf")
    stats = greedy.stats.as_dict()
    assert stats["backend"] == "openai" and stats["requests_sent"] == 2 * len(CONVS) and stats["retries"] == 0
    assert greedy.fleet.dialects == {llama_server.url: "llama_cpp" if cpp else "openai"}, "from /v1/models owned_by"
    sampler = generator(smollm2_tokenizer_dir, llama_server.url, in_flight=in_flight, temperature=1.0, top_p=0.95)
    together = [c.text for c in sampler.chat(CONVS, seed=1)]
    assert [sampler.chat([c], seed=1)[0].text for c in CONVS] == together, "a row's sample ignores other rows"
    assert [c.text for c in sampler.chat(CONVS, seed=2)] != together


def test_choice_scoring_agrees_with_the_transformers_engine(
    any_server, smollm2_dir, smollm2_tokenizer_dir, server_env
):
    """The server's top-k log-probs after the "(" prefill are the option letters' probabilities: they match the
    dequantized weights run locally, up to llama.cpp's Q4_1 arithmetic. llama-cpp-python answers in the legacy
    `logprobs.top_logprobs` form, llama-server in `logprobs.content[0].top_logprobs`: both are read."""
    llama_server = any_server
    cfg = engines.ScoringConfig(backend="openai", server=server_cfg(llama_server.url), progress=False)
    scorer = engines.make_choice_scorer(smollm2_tokenizer_dir, cfg)
    prefills = [labeling.answer_prefill()] * len(QUESTIONS)
    remote = scorer.choice_logprobs(QUESTIONS, prefills)
    local = hf.TransformersChoiceScorer.from_dir(smollm2_dir, engines.ScoringConfig(dtype="float32", progress=False))
    for (ra, rb), (la, lb) in zip(remote, local.choice_logprobs(QUESTIONS, prefills), strict=True):
        assert ra < 0 and rb < 0 and math.exp(ra) + math.exp(rb) <= 1
        assert labeling.normalize(ra, rb) == pytest.approx(labeling.normalize(la, lb), abs=0.06)
    assert scorer.stats.engine["options_outside_top_k"] == 0


def test_api_key_comes_from_the_environment(any_server, smollm2_tokenizer_dir, monkeypatch):
    llama_server = any_server
    monkeypatch.delenv(servers.API_KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=servers.API_KEY_ENV):
        generator(smollm2_tokenizer_dir, llama_server.url)
    monkeypatch.setenv(servers.API_KEY_ENV, "wrong-key")
    with pytest.raises(openai.ServerError, match="HTTP 401") as err:
        generator(smollm2_tokenizer_dir, llama_server.url)
    assert "wrong-key" not in str(err.value)


def test_a_server_down_at_start_is_read_for_its_dialect_when_it_comes_up(
    cpp_llama_server, smollm2_gguf, smollm2_tokenizer_dir, server_env, tmp_path
):
    """A vLLM that is still loading when the stage starts must not keep the plain dialect (double BOS) once up."""
    late = servers.free_port()
    late_url = f"http://127.0.0.1:{late}/v1"
    gen = generator(smollm2_tokenizer_dir, cpp_llama_server.url, late_url, in_flight=1)
    assert gen.fleet.dialects == {cpp_llama_server.url: "llama_cpp", late_url: "openai"}, "unknown while down"
    with servers.running(smollm2_gguf, tmp_path, cpp=True, port=late):
        answers = gen.chat(CONVS, seed=0)
    assert all(a.text for a in answers)
    assert gen.fleet.dialects == {cpp_llama_server.url: "llama_cpp", late_url: "llama_cpp"}, "read once it is up"


def test_no_server_answering_is_an_error_naming_them(smollm2_tokenizer_dir, server_env):
    dead = [f"http://127.0.0.1:{servers.free_port()}/v1" for _ in range(2)]
    with pytest.raises(openai.ServerError) as err:
        generator(smollm2_tokenizer_dir, *dead)
    assert all(url in str(err.value) for url in dead)
    fleet = openai.Fleet(server_cfg(*dead, max_retries=3))
    with pytest.raises(openai.ServerError) as err:
        fleet.complete([{"prompt": "hi", "max_tokens": 1}])
    assert all(url in str(err.value) for url in dead)


def test_the_row_cache_answers_without_asking_the_server(llama_server, smollm2_tokenizer_dir, server_env, tmp_path):
    from caiforge import rowcache

    first = generator(smollm2_tokenizer_dir, llama_server.url, weights=Q4, temperature=0.7)
    first.cache = rowcache.RowCache(tmp_path)
    want = first.chat(CONVS, seed=3)
    assert first.fleet.requests_sent == len(CONVS) and first.stats.cache_hits == 0
    first.cache.close()
    again = generator(smollm2_tokenizer_dir, llama_server.url, weights=Q4, temperature=0.7)
    again.cache = rowcache.RowCache(tmp_path)
    assert again.chat(CONVS[:3] + CONVS, seed=3) == want[:3] + want
    assert again.fleet.requests_sent == 0 and again.stats.cache_hits == len(CONVS)
    assert again.chat(CONVS[:2], seed=4) and again.fleet.requests_sent == 2, "another seed is another request"

    cfg = engines.ScoringConfig(backend="openai", server=server_cfg(llama_server.url, weights=Q4), progress=False)
    scorer = engines.make_choice_scorer(smollm2_tokenizer_dir, cfg, rowcache.RowCache(tmp_path / "s"))
    prefills = [labeling.answer_prefill()] * len(QUESTIONS)
    scores = scorer.choice_logprobs(QUESTIONS, prefills)
    scorer.cache.close()
    cached = engines.make_choice_scorer(smollm2_tokenizer_dir, cfg, rowcache.RowCache(tmp_path / "s"))
    assert cached.choice_logprobs(QUESTIONS, prefills) == scores and cached.fleet.requests_sent == 0


def test_rows_follow_the_weights_behind_the_served_name(served_dirs, server_env, tmp_path):
    """Retrained weights restarted under the same served name: keyed by the role's model directory
    (`server.weights: model_dir`), every row is asked again and equals a cache-less run on the new weights; a
    stated revision keys rows the same way; a served name alone is never answered from the row cache."""
    from caiforge import rowcache

    before, after = served_dirs
    cache_dir = tmp_path / "cache"
    with servers.running(before / SERVED_GGUF, tmp_path, alias="sft") as server:
        old = generator(before, server.url, weights="model_dir", cache=rowcache.RowCache(cache_dir))
        old_rows = old.chat(CONVS, seed=0)
        assert old.identity == f"openai:sft@{identity.fingerprint(before)}"
        old.cache.close()
        stated = generator(before, server.url, weights="revision:r1", cache=rowcache.RowCache(cache_dir))
        assert stated.chat(CONVS, seed=0) == old_rows and stated.fleet.requests_sent == len(CONVS)
        stated.cache.close()
        named = generator(before, server.url, cache=rowcache.RowCache(cache_dir))
        assert named.chat(CONVS, seed=0) == old_rows
        assert named.fleet.requests_sent == len(CONVS) and named.stats.cache_hits == 0, "a name is not weights"
        named.cache.close()
    with servers.running(after / SERVED_GGUF, tmp_path, alias="sft") as server:
        fresh = generator(after, server.url).chat(CONVS, seed=0)
        assert fresh != old_rows, "the retrained weights answer differently (else this test proves nothing)"
        new = generator(after, server.url, weights="model_dir", cache=rowcache.RowCache(cache_dir))
        assert new.chat(CONVS, seed=0) == fresh
        assert new.stats.cache_hits == 0 and new.fleet.requests_sent == len(CONVS)
        new.cache.close()
        again = generator(after, server.url, weights="model_dir", cache=rowcache.RowCache(cache_dir))
        assert again.chat(CONVS, seed=0) == fresh and again.fleet.requests_sent == 0, "the new rows are reused"
        again.cache.close()
        restated = generator(after, server.url, weights="revision:r2", cache=rowcache.RowCache(cache_dir))
        assert restated.chat(CONVS, seed=0) == fresh and restated.stats.cache_hits == 0


def test_weights_must_be_named_in_a_known_form():
    for bad in ("abc", "revision:", "model-dir"):
        with pytest.raises(ValueError, match="server.weights"):
            engines.ServerConfig(urls=("http://x",), weights=bad)
    assert identity.weights_of("openai:sft@revision:r1") == "revision:r1"
    assert identity.weights_of("openai:org/m@abc") == "abc" and identity.weights_of("openai:sft") is None
    assert identity.same_weights("openai:judge@abc", ["abc"]) is True, "served and local: the same fingerprint"
    assert identity.same_weights("abc", ["openai:labeller@def"]) is False
    assert identity.same_weights("abc", ["openai:labeller"]) is None, "unknown weights: unknown"
    assert identity.same_weights("openai:judge", ["abc"]) is None


def test_every_decoding_field_is_pinned_in_the_request(llama_server, smollm2_tokenizer_dir, server_env):
    """Servers fill unset fields with their own defaults (llama.cpp: top-k 40, min-p 0.05, repeat penalty 1.1):
    each request names every one, so a server never changes what the params say."""
    gen = generator(smollm2_tokenizer_dir, llama_server.url, temperature=0.7, top_p=0.9, top_k=0)
    body = gen.payload("x", seed=7)
    assert (body["temperature"], body["top_p"], body["top_k"], body["min_p"], body["seed"]) == (0.7, 0.9, 0, 0.0, 7)
    assert body["repeat_penalty"] == body["repetition_penalty"] == 1.0
    assert body["frequency_penalty"] == body["presence_penalty"] == 0.0
    greedy = generator(smollm2_tokenizer_dir, llama_server.url, temperature=0.0, top_p=0.5).payload("x", seed=1)
    assert greedy["temperature"] == 0.0 and greedy["top_p"] == 1.0, "greedy decoding is not also nucleus-cut"


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory, smollm2_gguf, smollm2_tokenizer_dir):
    """SmolLM2 as a model whose tokenizer adds a BOS to every text it encodes, as Llama's and Gemma's do: its
    tokenizer.json gets a post-processor that puts `<|im_start|>` (id 1, the GGUF's BOS) first, and a copy of its GGUF
    says `tokenizer.ggml.add_bos_token = true`. Its chat template already starts every prompt with that token, so
    a server that adds one more runs two."""
    import json
    import shutil

    import gguf

    out = tmp_path_factory.mktemp("bos-model")
    tokenizer_dir = out / "tokenizer"
    shutil.copytree(smollm2_tokenizer_dir, tokenizer_dir)
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    bos = {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
    }
    (tokenizer_dir / "tokenizer.json").write_text(json.dumps(spec))
    served = out / "adds-bos.gguf"
    shutil.copy(smollm2_gguf, served)
    reader = gguf.GGUFReader(str(served), "r+")
    field = reader.fields["tokenizer.ggml.add_bos_token"]
    field.parts[field.data[0]][0] = True
    reader.data.flush()
    del reader
    assert gguf.GGUFReader(str(served)).fields["tokenizer.ggml.add_bos_token"].contents() is True
    return tokenizer_dir, served


@pytest.mark.parametrize("cpp", [True, False], ids=["llama-server", "llama-cpp-python"])
def test_every_server_runs_the_local_tokens_of_a_model_that_adds_a_bos(bos_model, cpp, tmp_path, server_env):
    """The prompt a server runs is token for token the one the transformers engine runs (the rendered template,
    nothing added): llama-server is sent the token ids, llama-cpp-python (text only) the text without the BOS it
    adds itself. Each server says how many tokens it ran (`usage`), and llama-cpp-python which (/extras/tokenize,
    the tokenization its completions use)."""
    import json
    import urllib.request

    from transformers import AutoTokenizer

    from caiforge.engines import rendering

    tokenizer_dir, served = bos_model
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert rendering.added_bos(tokenizer) == "<|im_start|>" and tokenizer("Hi")["input_ids"][0] == 1
    with servers.running(served, tmp_path, cpp=cpp) as server:
        gen = generator(tokenizer_dir, server.url, in_flight=1, max_new_tokens=2)
        texts = [gen.render_chat(c) for c in CONVS[:3]]
        local = [rendering.encode(tokenizer, t) for t in texts]
        assert all(ids[:2] == [1, ids[1]] and ids[1] != 1 for ids in local), "the template's one BOS"
        answers = gen.fleet.complete([gen.payload(t, 0) for t in texts])
        assert [a["usage"]["prompt_tokens"] for a in answers] == [len(ids) for ids in local]
        if not cpp:
            for text, ids in zip(texts, local, strict=True):
                sent = openai.in_dialect({"prompt": text}, "openai", gen.fleet.tokenize, gen.fleet.bos)["prompt"]
                request = urllib.request.Request(
                    server.url.removesuffix("/v1") + "/extras/tokenize",
                    data=json.dumps({"input": sent}).encode(),
                    headers={"Authorization": f"Bearer {servers.API_KEY}", "Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=30) as resp:
                    assert json.load(resp)["tokens"] == ids
        assert "2 BOS" not in server.log.read_text()
