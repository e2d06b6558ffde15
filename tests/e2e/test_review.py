"""`caiforge review` on a built smoke workspace: a real server process, driven by headless Chromium through Selenium
(Debian's chromium + chromium-driver), then `dvc status` and `dvc repro label` read what the page wrote."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import polars as pl
import pytest

from caiforge import human_labels, labeling
from tests.e2e import pipeline

QUEUE = "data/label/review_queue.parquet"
LABELS = "data/seed/human_labels.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def review_cmd(repo: Path, port: int, reviewer: str = "ann") -> list[str]:
    return [sys.executable, "-m", "caiforge.cli", "review", "--port", str(port), "--reviewer", reviewer]


@contextmanager
def serving(repo: Path, reviewer: str = "ann"):
    """A `caiforge review` process on a free port; yields its URL once it says it is up."""
    port = free_port()
    proc = subprocess.Popen(
        review_cmd(repo, port, reviewer), cwd=repo, env=pipeline.env(repo), stdout=subprocess.PIPE, text=True
    )
    try:
        for line in proc.stdout:
            if line.startswith("Open http://"):
                break
        else:
            raise AssertionError(f"caiforge review exited ({proc.wait()}) without serving")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def browser(tmp_path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        if os.environ.get("CAIFORGE_REQUIRE_CHROMIUM"):
            pytest.fail("CAIFORGE_REQUIRE_CHROMIUM is set but chromium or chromedriver is missing")
        pytest.skip("Chromium or chromedriver not installed (.ci/run installs Debian's chromium, chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    drv = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    drv.implicitly_wait(10)
    yield drv
    drv.quit()


def press(drv, key: str, *, leaves: bool = True) -> None:
    """Press `key` on the page and, when it submits, wait until the next page has loaded."""
    from selenium.webdriver.support.ui import WebDriverWait

    before = drv.find_element("tag name", "html")
    drv.find_element("tag name", "body").send_keys(key)
    if leaves:
        WebDriverWait(drv, 20).until(lambda d: _stale(before))


def _stale(element) -> bool:
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        element.tag_name  # noqa: B018 - touching a replaced page's element raises
        return False
    except StaleElementReferenceException:
        return True


def on_page(drv) -> dict:
    """What the current pair page shows."""
    text = lambda i: drv.find_element("id", i).text  # noqa: E731
    return {
        "url": drv.current_url,
        "progress": text("progress"),
        "left": text("left").removeprefix("Left\n"),
        "right": text("right").removeprefix("Right\n"),
        "ai_open": drv.find_element("id", "ai-label").get_attribute("open") is not None,
    }


def test_review_by_keyboard_resume_change_and_label_reads_it(repo, browser):
    from selenium.webdriver.common.keys import Keys

    queue = pl.read_parquet(repo / QUEUE)
    total = queue.height
    assert total >= 4, "the smoke build queues enough pairs to review three and leave one"
    key_of = {labeling.pair_key(r["prompt_id"], r["chosen"], r["rejected"]): r for r in queue.iter_rows(named=True)}
    with serving(repo) as url:
        browser.get(url + "/")
        seen = []
        for key in (Keys.ARROW_LEFT, Keys.ARROW_RIGHT, "t"):
            page = on_page(browser)
            assert not page["ai_open"], "the AI's label stays hidden until the reviewer decides"
            seen.append(page)
            press(browser, key)
        assert [p["url"].split("?")[0] for p in seen] == [f"{url}/pair/{n}" for n in (1, 2, 3)]
        after = on_page(browser)
        assert after["progress"] == f"3 of {total} reviewed" and after["url"].startswith(f"{url}/pair/4")
        last = browser.find_element("id", "last").text
        assert last.startswith("Saved: pair 3, tie. The AI preferred the") and "cmp-" in last, "then it is shown"
        press(browser, "a", leaves=False)
        assert on_page(browser)["ai_open"], "or on request"

        browser.refresh()
        assert on_page(browser)["progress"] == f"3 of {total} reviewed", "a reload keeps the progress"
        # Closing the tab and opening the page again resumes at the first undecided pair.
        browser.get(url + "/")
        assert browser.current_url == f"{url}/pair/4"
        # Going back to pair 1 shows the verdict and the order it was given in; deciding again replaces it.
        browser.get(url + "/pair/1")
        revisit = on_page(browser)
        assert (revisit["left"], revisit["right"]) == (seen[0]["left"], seen[0]["right"]) and revisit["ai_open"]
        assert "Your verdict: left" in browser.find_element("id", "decided").text
        press(browser, Keys.ARROW_RIGHT)

    verdicts = human_labels.read(repo / LABELS)
    assert len(verdicts) == 3, "three pairs, one verdict each: the change replaced the first"
    by_prompt_text = {(v.chosen, v.rejected): v for v in verdicts.values()}
    first = by_prompt_text[(seen[0]["right"], seen[0]["left"])]
    second = by_prompt_text[(seen[1]["right"], seen[1]["left"])]
    assert first.verdict == second.verdict == "prefer"
    third = next(v for v in verdicts.values() if v.verdict == "tie")
    assert {third.chosen, third.rejected} == {seen[2]["left"], seen[2]["right"]}
    for v in (first, second):
        row, ai = v.row, key_of[v.key]
        assert row["reviewer"] == "ann" and row["time"].endswith("+00:00") and row["left"] == "rejected"
        assert row["pair_id"] == ai["pair_id"]
        assert row["ai_p_chosen"] == pytest.approx(ai["p_chosen"] if v.chosen == ai["chosen"] else 1 - ai["p_chosen"])

    status = pipeline.dvc(repo, "status", "label").stdout
    assert "changed deps" in status and LABELS in status, "a saved verdict makes label stale at once"
    assert pipeline.repro(repo, "label") == ["label"]
    prefs = pl.read_parquet(repo / "data/label/preferences.parquet")
    sources = {
        labeling.pair_key(r["prompt_id"], r["chosen"], r["rejected"]): (r["label_source"], r["chosen"])
        for r in prefs.iter_rows(named=True)
    }
    assert sources[first.key] == ("human", first.chosen) and sources[second.key] == ("human", second.chosen)
    assert sources[third.key][0] == "ai", "a tie keeps the AI label"
    metrics = json.loads((repo / "data/label/metrics.json").read_text())
    assert metrics["human_labels"] | metrics["human_agreement"] == {
        "rows": 3,
        "applied": 2,
        "tie": 1,
        "skip": 0,
        "unmatched": 0,
        "pairs": 2,
        "rate": metrics["human_agreement"]["rate"],
        "interval": metrics["human_agreement"]["interval"],
    }
    agree = [key_of[v.key]["chosen"] == v.chosen for v in (first, second)]
    assert metrics["human_agreement"]["rate"] == sum(agree) / 2
    assert pl.read_parquet(repo / QUEUE).equals(queue), "the queue keeps the decided pairs"


def _post(url: str, n: int, decision: str) -> None:
    data = urllib.parse.urlencode({"decision": decision, "left": "chosen"}).encode()
    req = urllib.request.Request(f"{url}/pair/{n}", data=data, method="POST")
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200


def test_two_reviewers_at_once_lose_no_verdict(repo):
    total = pl.read_parquet(repo / QUEUE).height
    with serving(repo, "ann") as ann, serving(repo, "bob") as bob:
        jobs = [(ann, n) for n in range(1, total + 1, 2)] + [(bob, n) for n in range(2, total + 1, 2)]

        errors: list[Exception] = []

        def work(url: str, mine: list[int]) -> None:
            try:
                for _ in range(5):  # each decides its pairs five times over, both writing at once
                    for n in mine:
                        _post(url, n, "left")
            except Exception as exc:  # noqa: BLE001 - reported by the test below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(u, [n for v, n in jobs if v == u])) for u in (ann, bob)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, "every request succeeded while the other reviewer wrote"
    verdicts = human_labels.read(repo / LABELS).values()
    assert len(verdicts) == total, "every pair has its one verdict"
    assert sorted(v.row["reviewer"] for v in verdicts) == sorted(["ann", "bob"] * (total // 2) + ["ann"] * (total % 2))


def run_review(repo: Path, port: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        review_cmd(repo, port or free_port()), cwd=repo, env=pipeline.env(repo), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def test_bad_workspaces_fail_with_a_message_and_touch_nothing(repo):
    labels = repo / LABELS
    labels.write_text('{"prompt_id": "x", "chosen": "a", "rejected": "b"}\n{"prompt_id": "x", "chosen": "a"}\n')
    before = labels.read_bytes()
    proc = run_review(repo)
    assert proc.returncode == 1 and f"{LABELS}: line 2: missing field 'rejected'" in proc.stderr
    assert labels.read_bytes() == before
    labels.write_text("")

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_review(repo, port)
    assert proc.returncode == 1 and f"cannot serve on 127.0.0.1:{port}" in proc.stderr

    queue = repo / QUEUE
    other = pl.read_parquet(queue).head(1)
    other.write_parquet(queue)
    proc = run_review(repo)
    assert proc.returncode == 1 and f"{QUEUE} is not the build dvc.lock records" in proc.stderr

    queue.unlink()
    proc = run_review(repo)
    assert proc.returncode == 1 and "no review queue: label has not run here" in proc.stderr
    assert labels.read_bytes() == b"", "no failure wrote the labels file"
    assert "Traceback" not in proc.stderr
