"""Explain and score across processes: ``--shard``, what belongs to a run's identity,
concurrent scoring, and the response cache under several writing processes. Offline and CPU:
a tiny GPT-2 is recorded once; the simulators are in-process fakes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import multiprocessing
import random
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import neuroscribe.cli as cli
import neuroscribe.pipeline as pipeline
from neuroscribe.errors import UserError
from neuroscribe.explain.core import ExplainConfig, explain
from neuroscribe.llm.client import Client, LLMConfig, Request, Response, ResponseCache
from neuroscribe.pipeline import ScoreConfig, score
from neuroscribe.record.core import RecordConfig, record
from neuroscribe.runs import claim_stage, identity, in_shard, parse_shard, save_stage
from neuroscribe.simulate.core import TokenMatchSimulator

HP = "transformer.h.0.mlp.act"
UNITS = 12

# --- shards -------------------------------------------------------------------------------


def test_parse_shard() -> None:
    assert parse_shard("0/1") == (0, 1) and parse_shard(" 2/3 ") == (2, 3)
    for bad in ("3/3", "-1/2", "1", "a/b", "1/0", ""):
        with pytest.raises(UserError, match="--shard"):
            parse_shard(bad)


def test_shards_partition_the_units_stably() -> None:
    units = [(hp, u) for hp in ("model.layers.0.mlp", "model.layers.1.mlp") for u in range(500)]
    for n in (1, 2, 3, 5):
        owners = [[i for i in range(n) if in_shard(hp, u, (i, n))] for hp, u in units]
        assert all(len(o) == 1 for o in owners)  # each unit in exactly one shard
        sizes = [sum(o == [i] for o in owners) for i in range(n)]
        assert min(sizes) > 0.8 * len(units) / n  # and the shards are about even
    # The split is a function of the name alone: the same on every machine and release.
    assert [u for u in range(12) if in_shard("transformer.h.0.mlp.act", u, (0, 2))] == \
        [3, 7, 9]


# --- identity -----------------------------------------------------------------------------


def test_settings_that_do_not_change_results_are_not_identity() -> None:
    loose = {"base_url", "api_key_env", "concurrency", "retries", "timeout", "cache_dir",
             "price_in", "price_out"}
    assert set(dataclasses.asdict(ScoreConfig())) - set(identity(ScoreConfig())) == \
        loose | {"shard"}
    assert set(dataclasses.asdict(ExplainConfig())) - set(identity(ExplainConfig())) == \
        loose | {"shard", "units"}


def test_claim_stage_compares_identity_and_lets_other_scopes_add_units(tmp_path: Path) -> None:
    cfg = ExplainConfig(explainer="highlight", units="first:4", provider="openai",
                        llm_model="m", base_url="http://a/v1", concurrency=2)
    save_stage(tmp_path, "explain", cfg, complete=True)
    other = dataclasses.replace(cfg, base_url="http://b/v1,http://c/v1", concurrency=64,
                                timeout=5.0, retries=1, cache_dir="/x", api_key_env="K")
    assert claim_stage(tmp_path, "explain", other, resume=True)
    with pytest.raises(UserError, match="--resume"):  # the same work again needs --resume
        claim_stage(tmp_path, "explain", other, resume=False)
    for scope in ({"units": "4-7"}, {"shard": "1/2"}):  # other units: added, not refused
        assert not claim_stage(tmp_path, "explain", dataclasses.replace(cfg, **scope), False)
    with pytest.raises(UserError, match="different run.*max_terms"):
        claim_stage(tmp_path, "explain", dataclasses.replace(cfg, max_terms=2), resume=True)


# --- a recorded run, explained --------------------------------------------------------------


@pytest.fixture(scope="module")
def explained_run(tiny_model: Path, corpus_file: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("scale") / "run"
    record(RecordConfig(model=str(tiny_model), corpus=str(corpus_file), hookpoints=HP,
                        max_tokens=3000, ctx_len=32, batch_size=16, quantile_warmup=8, n_top=12,
                        n_random=9, n_quantile=2), run)
    explain(ExplainConfig(units=f"first:{UNITS}"), run)
    return run


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def tree(run: Path, sub: str) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted((run / sub).rglob("*.json"))}


class SlowTokenSimulator(TokenMatchSimulator):
    """The tokens simulator, answering after a random delay (so units finish out of order)."""

    def __init__(self, seed: int) -> None:
        super().__init__(ScoreConfig(simulator="tokens"))
        self.rng = random.Random(seed)

    async def simulate(self, explanation: str, tokens: Any) -> Any:
        await asyncio.sleep(self.rng.uniform(0, 0.01))
        return await super().simulate(explanation, tokens)


def test_concurrent_scoring_writes_what_one_at_a_time_writes(
        explained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original, live, peak = pipeline.score_unit, [0], [0]

    async def counted(*a: Any) -> Any:
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        try:
            return await original(*a)
        finally:
            live[0] -= 1

    monkeypatch.setattr(pipeline, "score_unit", counted)
    one = copy_run(explained_run, tmp_path / "one")
    score(ScoreConfig(simulator="tokens"), one, sim=SlowTokenSimulator(0))
    assert peak[0] == 1  # the default for the in-process provider: one unit at a time
    many = copy_run(explained_run, tmp_path / "many")
    peak[0] = 0
    score(ScoreConfig(simulator="tokens", concurrency=5), many, sim=SlowTokenSimulator(1))
    assert peak[0] == 5  # bounded by --concurrency, and reached
    assert tree(many, "scores") == tree(one, "scores") and len(tree(one, "scores")) > UNITS

    def counts(run: Path) -> list[int]:
        stage = json.loads((run / "score.json").read_text())
        return [stage[k] for k in ("scored", "failed", "skipped")]

    assert counts(many) == counts(one) and counts(one)[0] > 0


def test_shards_share_one_folder_and_match_the_whole(explained_run: Path,
                                                     tmp_path: Path) -> None:
    whole = copy_run(explained_run, tmp_path / "whole")
    assert cli.main(["score", str(whole), "--simulator", "tokens"]) == 0
    shared = copy_run(explained_run, tmp_path / "shared")
    for i in range(3):  # three processes, one after another here, each adding its shard
        assert cli.main(["score", str(shared), "--simulator", "tokens", "--shard",
                         f"{i}/3", "--concurrency", str(i + 1)]) == 0
        done = {p.name for p in (shared / "scores").rglob("*.scores.json")}
        assert len(done) < UNITS or i == 2
    assert tree(shared, "scores") == tree(whole, "scores")
    index = sqlite3.connect(shared / "index.sqlite")
    assert index.execute("SELECT count(DISTINCT unit) FROM scores").fetchone()[0] == UNITS


def test_explain_shards_add_up_to_the_whole(explained_run: Path, tmp_path: Path) -> None:
    run = copy_run(explained_run, tmp_path / "run")
    shutil.rmtree(run / "explanations")
    (run / "explain.json").unlink()
    for i in range(2):
        assert cli.main(["explain", str(run), "--units", f"first:{UNITS}", "--shard",
                         f"{i}/2"]) == 0
        mine = {int(p.stem) for p in (run / "explanations").rglob("*.json")}
        assert {u for u in range(UNITS) if in_shard(HP, u, (i, 2))} <= mine
        assert len(mine) < UNITS or i == 1
    assert tree(run, "explanations") == tree(explained_run, "explanations")


def test_resume_after_changing_concurrency_or_endpoints(explained_run: Path,
                                                        tmp_path: Path) -> None:
    run = copy_run(explained_run, tmp_path / "run")
    assert cli.main(["score", str(run), "--simulator", "tokens", "--concurrency", "1",
                     "--base-url", "http://a:1/v1"]) == 0
    first = tree(run, "scores")
    next(iter((run / "scores").rglob("3.json"))).unlink()
    assert cli.main(["score", str(run), "--simulator", "tokens", "--concurrency", "4",
                     "--base-url", "http://b:1/v1,http://c:1/v1", "--timeout", "9",
                     "--resume"]) == 0
    assert tree(run, "scores") == first
    # A second process explaining other units adds them (and skips the done ones on resume).
    assert cli.main(["explain", str(run), "--units", "12-15"]) == 0
    assert cli.main(["explain", str(run), "--units", "10-17", "--resume"]) == 0
    assert len(list((run / "explanations").rglob("*.json"))) == 18


# --- the response cache, several processes at once ------------------------------------------


def _writer(path: str, worker: int, n: int) -> None:
    cache = ResponseCache(Path(path))
    for i in range(n):
        cache.put(f"k{worker}-{i}", Response(text=f"{worker}:{i}", prompt_tokens=i))
        cache.put(f"shared-{i}", Response(text=f"shared {i}"))
        assert cache.get(f"k{worker}-{i}").text == f"{worker}:{i}"  # type: ignore[union-attr]


def test_the_response_cache_takes_several_writing_processes(tmp_path: Path) -> None:
    path = tmp_path / "responses.sqlite"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), w, 150)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    cache = ResponseCache(path)
    for w in range(4):
        for i in range(150):
            assert cache.get(f"k{w}-{i}") == Response(text=f"{w}:{i}", prompt_tokens=i,
                                                      cached=True)
    n = cache.db.execute("SELECT count(*) FROM responses").fetchone()[0]
    assert n == 4 * 150 + 150


def test_a_locked_cache_costs_a_miss_not_a_failed_request(tmp_path: Path) -> None:
    class Echo:
        name, model = "fake", "m"

        async def complete(self, req: Request) -> Response:
            return Response(text=req.prompt)

    path = tmp_path / "responses.sqlite"
    cache = ResponseCache(path, busy_timeout=0.1)
    cache.put("before", Response(text="x"))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process in the middle of a long write
    try:
        client = Client(Echo(), LLMConfig(), cache)
        resp = asyncio.run(client.complete(Request(prompt="hello")))
        assert resp.text == "hello" and not resp.cached
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert asyncio.run(client.complete(Request(prompt="again"))).text == "again"
    assert cache.get(Request(prompt="again").key("fake", "m")) is not None
