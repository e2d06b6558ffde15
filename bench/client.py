"""Benchmark: how many requests/s the `openai` engine's own process sustains, against a server that answers at once.

A stub OpenAI-compatible server (aiohttp, in its own process on 127.0.0.1) answers /v1/models and every
/v1/completions at once with a fixed body: one token with top-k log-probs for scoring, a short text with `usage` for
generation. Nothing the engine does is skipped: prompts are rendered with the policy's chat template, options are
planned, row keys are hashed, requests go through the fleet (aiohttp, bounded in-flight, retries) and answers are
parsed. The row cache is off, so every row is a request.

For each case (`scoring`: `label`-like comparison questions with two few-shot demos; `generation`:
`critique_revise`'s critique requests with two few-shot dialogues), at each size (`--sizes`, default 2,000 and
20,000 prompts), a fresh interpreter runs the call once and reports requests/s over the whole call (render to
parsed rows) and the process's peak RSS (torch, transformers and the tokenizer included; flat in N when the call
adds little). The stub's own rate (a bare aiohttp client, nothing else) comes first, so the figures read against
what the loopback and stub allow.

Last lines, side by side in this run: `client: <case> <n> prompts <req/s> req/s, <MiB> MiB peak (<MiB> in the
call)`, the last figure being the peak above what the process held with its inputs built.

    uv run --group server python bench/client.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from caiforge.engines.serving import free_port

ROOT = Path(__file__).resolve().parents[1]

STUB = r"""
import json, sys
from aiohttp import web

MODEL = "stub"
SCORE = {"choices": [{"text": "A", "index": 0, "finish_reason": "length",
                      "logprobs": {"top_logprobs": [{"A": -0.4, "B": -1.3, "C": -3.0}]}}],
         "usage": {"prompt_tokens": 0, "completion_tokens": 1}}
CHAT = {"choices": [{"text": " Sure, here is a short answer.", "index": 0, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 8}}
models_body = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "stub"}]}).encode()

async def models(request):
    return web.Response(body=models_body, content_type="application/json")

async def completions(request):
    body = await request.json()
    answer = SCORE if body.get("max_tokens") == 1 else CHAT
    # Servers report the prompt's token count in `usage`; about four characters per token here.
    answer = {**answer, "usage": {**answer["usage"], "prompt_tokens": 1 + len(body["prompt"]) // 4}}
    return web.Response(text=json.dumps(answer), content_type="application/json")

app = web.Application()
app.router.add_get("/v1/models", models)
app.router.add_post("/v1/completions", completions)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""

BARE = r"""
import asyncio, json, sys, time
import aiohttp

async def main(url, n, in_flight):
    body = {"prompt": "x" * 2000, "max_tokens": 1, "logprobs": 5}
    queue = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def worker():
            while not queue.empty():
                queue.get_nowait()
                async with session.post(url + "/completions", json=body) as resp:
                    json.loads(await resp.read())
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return n / (time.perf_counter() - t0)

print(asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
"""

CASE = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
from bench.generation import label_questions, load_prompts
from pathlib import Path
from caiforge import constitution, engines, labeling, prompts

case, n, url, tokenizer, in_flight = {case!r}, {n}, {url!r}, {tokenizer!r}, {in_flight}
server = engines.ServerConfig(urls=(url,), max_in_flight=in_flight, weights="revision:stub")
if case == "scoring":
    # Every question differs (its index is in the prompt), as real questions do.
    questions = label_questions(n, 2)
    questions = [q[:-1] + [{{**q[-1], "content": f"{{q[-1]['content']}} ({{i}})"}}]
                 for i, q in enumerate(questions)]
    prefills = [labeling.answer_prefill()] * n
    cfg = engines.ScoringConfig(backend="openai", server=server, progress=False)
    engine = engines.make_choice_scorer(tokenizer, cfg)
    run = lambda: engine.choice_logprobs(questions, prefills)
else:
    # critique requests as critique_revise sends them: a few-shot dialogue, the prompt, the answer, the request.
    parts = constitution.load(Path({root!r}) / "constitutions" / "default.yaml")
    examples, principles = parts.critique_revision_examples[:2], parts.critique_revision
    convs = [
        prompts.critique(c[0]["content"], f"An answer ({{i}}).", principles[i % len(principles)], examples)
        for i, c in enumerate(load_prompts(n))
    ]
    cfg = engines.GenerationConfig(
        backend="openai", server=server, max_new_tokens=128, temperature=0.7, progress=False
    )
    engine = engines.make_generator(tokenizer, cfg)
    run = lambda: engine.chat(convs, seed=0)
def rss_mib():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024
held = rss_mib()  # the process with its inputs built, before the call
t0 = time.perf_counter()
rows = run()
seconds = time.perf_counter() - t0
assert len(rows) == n and engine.fleet.requests_sent == n, (len(rows), engine.fleet.requests_sent)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"rps": n / seconds, "seconds": seconds, "peak_mib": peak / 1024, "call_mib": peak / 1024 - held}}))
"""


def start_stub(log: Path) -> tuple[subprocess.Popen, str]:
    import urllib.request

    port = free_port()
    cmd = [sys.executable, "-c", STUB, str(port)]
    process = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(100):
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=1):
                return process, url
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the stub server did not start: {log.read_text()[-2000:]}")


def python(code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"benchmark process failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=str(ROOT / "data/models/policy"), help="a model dir with a tokenizer")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--cases", nargs="+", default=["scoring", "generation"], choices=["scoring", "generation"])
    parser.add_argument("--in-flight", type=int, default=32, help="server.max_in_flight")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        stub, url = start_stub(Path(tmp) / "stub.log")
        try:
            bare = float(python(BARE, url, "5000", str(args.in_flight)))
            print(f"stub: {bare:.0f} req/s (a bare aiohttp client, {args.in_flight} in flight)", flush=True)
            for case in args.cases:
                for n in args.sizes:
                    code = CASE.format(
                        root=str(ROOT), case=case, n=n, url=url, tokenizer=args.tokenizer, in_flight=args.in_flight
                    )
                    out = json.loads(python(code))
                    results.append((case, n, out))
                    print(f"  {case} {n}: {out['seconds']:.1f} s", flush=True)
        finally:
            stub.kill()
    print(f"cpus={os.cpu_count()} in_flight={args.in_flight}")
    for case, n, out in results:
        peak, call = out["peak_mib"], out["call_mib"]
        print(f"client: {case} {n} prompts {out['rps']:.0f} req/s, {peak:.0f} MiB peak ({call:+.0f} MiB in the call)")


if __name__ == "__main__":
    main()
