"""Providers: their own key variables and defaults, a clear error without a model, setup
errors (401, 403, 404) that stop a stage at once; the TOML run config."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from neuroscribe import cli
from neuroscribe.errors import UserError
from neuroscribe.llm.client import LLMConfig, LLMSetupError, make_client, resolve
from neuroscribe.run_config import dump_run_config, load_run_config, stage_configs


def test_each_provider_has_its_own_key_variable() -> None:
    assert resolve(LLMConfig(provider="anthropic", llm_model="c")).api_key_env \
        == "ANTHROPIC_API_KEY"
    assert resolve(LLMConfig(provider="openai", llm_model="m")).api_key_env == "OPENAI_API_KEY"
    mine = LLMConfig(provider="anthropic", llm_model="c", api_key_env="MY_KEY")
    assert resolve(mine).api_key_env == "MY_KEY"


def test_an_http_provider_without_a_model_is_a_clear_error() -> None:
    for provider in ("openai", "anthropic"):
        with pytest.raises(UserError, match="needs --llm-model"):
            make_client(LLMConfig(provider=provider))
    with pytest.raises(UserError, match="unknown LLM provider 'nope'"):
        resolve(LLMConfig(provider="nope"))


def test_in_process_backends_run_one_request_at_a_time() -> None:
    local = resolve(LLMConfig())
    assert (local.llm_model, local.concurrency) == ("qwen2.5-coder-1.5b", 1)
    assert resolve(LLMConfig(provider="hf", llm_model="x")).concurrency == 1
    assert resolve(LLMConfig(provider="openai", llm_model="m")).concurrency == 8
    assert resolve(LLMConfig(provider="openai", llm_model="m", concurrency=3)).concurrency == 3


class _Refuser(http.server.BaseHTTPRequestHandler):
    status = 401
    hits: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        type(self).hits.append(self.path)
        body = json.dumps({"error": {"message": "Incorrect API key provided"}}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a: object) -> None:
        pass


@pytest.fixture
def refuser() -> Iterator[tuple[str, type[_Refuser]]]:
    handler = type("Handler", (_Refuser,), {"hits": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", handler
    server.shutdown()


@pytest.fixture(scope="module")
def recorded(tiny_model: Path, corpus_file: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> Path:
    out = tmp_path_factory.mktemp("providers") / "run"
    argv = ["record", "--out", str(out), "--model", str(tiny_model), "--corpus",
            str(corpus_file), "--hookpoints", "transformer.h.0.mlp.act", "--max-tokens", "2000",
            "--ctx-len", "32", "--quantile-warmup", "8", "--n-top", "8", "--n-random", "6",
            "--n-quantile", "1"]
    assert cli.main(argv) == 0
    return out


@pytest.mark.parametrize("status,says", [(401, "authentication failed"), (403, "forbidden"),
                                         (404, "not found")])
def test_a_setup_error_stops_the_explain_stage_at_once(
        recorded: Path, refuser: tuple[str, type[_Refuser]], status: int, says: str,
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    url, handler = refuser
    handler.status = status
    run = tmp_path / "run"
    shutil.copytree(recorded, run)
    argv = ["explain", str(run), "--explainer", "openai", "--provider", "openai",
            "--base-url", url, "--llm-model", "m", "--units", "first:12", "--retries", "3",
            "--concurrency", "2", "--cache-dir", str(tmp_path / "cache")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"HTTP {status}" in err[0] and says in err[0], err
    assert len(handler.hits) <= 2  # no retries, no other units: not 12 units x 4 attempts
    stage = json.loads((run / "explain.json").read_text())
    assert stage["complete"] is False


TOML = """
[record]
max_tokens = 2000
ctx_len = 32
quantile_warmup = 8
n_top = 8
n_random = 6
n_quantile = 1

[explain]
explainer = "tokens"
provider = "openai"
llm_model = "explainer-model"

[score]
simulator = "tokens"
llm_model = "scorer-model"
"""


def test_run_config_tables_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(TOML)
    tables = load_run_config(path)
    cfgs = stage_configs(tables, {"units": "first:3", "provider": "hf"})
    assert cfgs["explain"].llm_model == "explainer-model"
    assert cfgs["score"].llm_model == "scorer-model"
    assert cfgs["explain"].provider == cfgs["score"].provider == "hf"  # the flag sets both
    assert cfgs["explain"].units == "first:3" and cfgs["record"].max_tokens == 2000
    again = tmp_path / "again.toml"
    again.write_text(dump_run_config(cfgs))
    assert stage_configs(load_run_config(again), {}) == cfgs


@pytest.mark.parametrize("text,says", [("[recrod]\nx = 1\n", "unknown table"),
                                       ("[record]\nmax_tokenz = 1\n", "no field 'max_tokenz'"),
                                       ("[record]\nmax_tokens = 'many'\n", "expected int"),
                                       ("[record\n", "not valid TOML")])
def test_a_bad_run_config_is_a_clear_error(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=says):
        load_run_config(path)


def test_cli_run_reads_the_config_and_saves_it(tiny_model: Path, corpus_file: Path,
                                               tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(TOML)
    out = tmp_path / "run"
    argv = ["run", "--config", str(path), "--out", str(out), "--model", str(tiny_model),
            "--corpus", str(corpus_file), "--hookpoints", "transformer.h.0.mlp.act",
            "--units", "first:2", "--ctx-len", "16"]
    assert cli.main(argv) == 0
    saved = load_run_config(out / "run.toml")
    assert saved["explain"]["llm_model"] == "explainer-model"
    assert saved["score"]["llm_model"] == "scorer-model"
    assert saved["record"]["max_tokens"] == 2000  # from the file
    assert saved["record"]["ctx_len"] == 16  # the flag wins over the file
    assert json.loads((out / "explain.json").read_text())["config"]["units"] == "first:2"


class _Refused:
    """An agent or explainer whose LLM endpoint refuses the key."""

    async def solve(self, box: object, category: str) -> None:
        raise LLMSetupError("HTTP 401: authentication failed")

    async def explain(self, records: object, background: object) -> None:
        raise LLMSetupError("HTTP 401: authentication failed")


def test_a_setup_error_ends_a_find_run_instead_of_failing_each_function() -> None:
    import asyncio

    from neuroscribe.find.eval import FindConfig
    from neuroscribe.find.function import FindFunction
    from neuroscribe.find.report import solve_one

    fn = FindFunction("f", "numeric", "linear", "x", "[-128, 128]", "def f(x):\n    return x")
    with pytest.raises(LLMSetupError):
        asyncio.run(solve_one(_Refused(), fn, None, FindConfig()))  # type: ignore[arg-type]


def test_a_setup_error_ends_the_puzzle_check_instead_of_failing_each_puzzle() -> None:
    from neuroscribe.groundtruth.puzzles import PuzzleConfig, check

    cfg = PuzzleConfig(simulators="", explainers="refused")
    with pytest.raises(LLMSetupError):
        check(cfg, lambda name: None, lambda name: _Refused())
