"""Bad input: one clear line on stderr, a non-zero exit, no traceback, no partial output.

Every case goes through the CLI (``neuroscribe.cli.main``); ``--debug`` raises instead.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import transformers  # noqa: F401 - import (and set up its logging) outside any capsys

import neuroscribe.cli as cli
import neuroscribe.record.core as record_mod
from neuroscribe.errors import UserError

HP0 = "transformer.h.0.mlp.act"
SMALL = ["--max-tokens", "3000", "--ctx-len", "32", "--batch-size", "16",
         "--quantile-warmup", "8", "--n-top", "8", "--n-random", "6", "--n-quantile", "2"]
LATIN1 = "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve r\u00e9sum\u00e9\n"


def record_argv(out: Path, model: Path | str, corpus: Path | str, hookpoints: str = HP0,
                *extra: str) -> list[str]:
    return ["record", "--out", str(out), "--model", str(model), "--corpus", str(corpus),
            "--hookpoints", hookpoints, *SMALL, *extra]


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI, expect a failure reported as one 'neuroscribe: error:' line; return it."""
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback" not in err
    lines = err.rstrip("\n").splitlines()
    errors = [line for line in lines if line.startswith("neuroscribe: error:")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], f"the error is not one line, or not the last: {err!r}"
    assert "rerun with --debug" not in errors[0], "a bad input should be a UserError"
    return errors[0]


def assert_no_output(out: Path) -> None:
    assert not (out / "records").exists()
    assert not (out / "record.json").exists()
    assert not (out / "vocab.json").exists()


def test_missing_model_path(tmp_path: Path, corpus_file: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    for model, words in [(tmp_path / "no" / "such-model", "model path not found"),
                         ("./no-such-model", "model path not found"),
                         (tmp_path / "model.gguf", "model file not found")]:
        msg = one_line_error(capsys, record_argv(out, model, corpus_file))
        assert words in msg and str(model) in msg
        assert_no_output(out)


def test_folder_without_config_json(tmp_path: Path, corpus_file: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "not-a-model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"\0" * 16)
    out = tmp_path / "run"
    msg = one_line_error(capsys, record_argv(out, model, corpus_file))
    assert "config.json" in msg and str(model) in msg
    assert_no_output(out)
    msg = one_line_error(capsys, ["hookpoints", str(model)])
    assert "config.json" in msg


@pytest.mark.parametrize("hookpoint,close", [
    ("transformer.h.0.mlp.actt", "transformer.h.0.mlp.act"),
    ("transformer.h.1.mlp.c_fcc", "transformer.h.1.mlp.c_fc"),
    ("transformer.h.0.mlp.act,transformer.h.9.mlp.act", "transformer.h.0.mlp.act"),
])
def test_unknown_hookpoint_names_closest_matches(hookpoint: str, close: str, tmp_path: Path,
                                                 tiny_model: Path, corpus_file: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    msg = one_line_error(capsys, record_argv(out, tiny_model, corpus_file, hookpoint))
    bad = [h for h in hookpoint.split(",") if h != close][0]
    assert f"unknown hookpoint {bad!r}" in msg
    assert "closest" in msg and close in msg.split("closest", 1)[1]
    assert "neuroscribe hookpoints" in msg
    assert_no_output(out)


def test_unknown_hookpoint_option(tmp_path: Path, tiny_model: Path, corpus_file: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    msg = one_line_error(capsys, record_argv(out, tiny_model, corpus_file, f"{HP0}:inptu"))
    assert "'inptu'" in msg and ":input" in msg
    assert_no_output(out)


def test_hookpoint_that_never_runs(tmp_path: Path, tiny_model: Path, corpus_file: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """GPT-2's attention dropout module is skipped by the SDPA attention path."""
    import torch
    from transformers import AutoModelForCausalLM

    name = "transformer.h.0.attn.attn_dropout"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    fired: list[bool] = []
    dict(model.named_modules())[name].register_forward_hook(lambda *_: fired.append(True))
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 4), dtype=torch.long))
    if fired:
        pytest.skip(f"{name} runs in this transformers version")
    out = tmp_path / "run"
    msg = one_line_error(capsys, record_argv(out, tiny_model, corpus_file, name))
    assert name in msg and "never ran" in msg
    assert_no_output(out)


def test_hookpoint_without_a_batch_dimension(tmp_path: Path, tiny_model: Path,
                                             corpus_file: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """GPT-2's position embedding gives [1, seq, d] for a whole batch: not per-context units."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    shapes: list[tuple[int, ...]] = []
    model.transformer.wpe.register_forward_hook(lambda _m, _a, o: shapes.append(tuple(o.shape)))
    with torch.no_grad():
        model(input_ids=torch.zeros((3, 4), dtype=torch.long))
    if shapes[0][0] == 3:
        pytest.skip("this transformers version expands position ids over the batch")
    out = tmp_path / "run"
    msg = one_line_error(capsys, record_argv(out, tiny_model, corpus_file, "transformer.wpe"))
    assert "transformer.wpe" in msg and "[batch, seq, units]" in msg
    assert_no_output(out)


def test_empty_corpus_file(tmp_path: Path, tiny_model: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "empty.txt"
    corpus.write_text("")
    out = tmp_path / "run"
    msg = one_line_error(capsys, record_argv(out, tiny_model, corpus))
    assert "empty" in msg and str(corpus) in msg
    assert_no_output(out)
    # Shorter than one context is the same error.
    corpus.write_text("the cat sat\n")
    msg = one_line_error(capsys, record_argv(out, tiny_model, corpus))
    assert "shorter than one context" in msg
    assert_no_output(out)


def test_empty_corpus_folder(tmp_path: Path, tiny_model: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "texts"
    corpus.mkdir()
    out = tmp_path / "run"
    msg = one_line_error(capsys, record_argv(out, tiny_model, corpus))
    assert "no files" in msg
    assert_no_output(out)


@pytest.mark.parametrize("spec", ["missing.txt", "nothing-*.txt", "{good},missing.txt"])
def test_corpus_path_not_found(spec: str, tmp_path: Path, tiny_model: Path, corpus_file: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    spec = spec.replace("{good}", str(corpus_file)).replace("missing", str(tmp_path / "missing"))
    spec = spec.replace("nothing", str(tmp_path / "nothing"))
    out = tmp_path / "run"
    msg = one_line_error(capsys, record_argv(out, tiny_model, spec))
    assert "corpus path not found" in msg and str(tmp_path) in msg
    assert_no_output(out)


def write_not_utf8(folder: Path) -> list[Path]:
    """A Latin-1 file, and one whose first 100 kB are fine and only the end is not UTF-8."""
    folder.mkdir(parents=True, exist_ok=True)
    latin = folder / "latin1.txt"
    latin.write_bytes((LATIN1 * 200).encode("latin-1"))
    late = folder / "late.txt"
    late.write_bytes(("the cat sat on a mat while red birds sang\n" * 2500).encode()
                     + "caf\u00e9\n".encode("latin-1"))
    assert late.stat().st_size > 100_000
    return [latin, late]


def tensors(path: Path) -> dict[str, bytes]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k).tobytes() for k in f.keys()}  # noqa: SIM118


def test_non_utf8_file_is_skipped_with_a_warning(tmp_path: Path, tiny_model: Path,
                                                 corpus_file: Path,
                                                 caplog: pytest.LogCaptureFixture,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    bad = write_not_utf8(tmp_path / "bad")
    out, ref = tmp_path / "run", tmp_path / "ref"
    with caplog.at_level(logging.WARNING, logger="neuroscribe"):
        rc = cli.main(record_argv(out, tiny_model, ",".join([str(bad[0]), str(bad[1]),
                                                              str(corpus_file)])))
    assert rc == 0, capsys.readouterr().err
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for path in bad:
        assert any(str(path) in w and "UTF-8" in w for w in warned), warned
    assert (out / "records" / f"{HP0}.safetensors").is_file()
    # Skipped whole: the run equals one over the good file alone (the late file's first
    # 100 kB of valid text would otherwise come first).
    assert cli.main(record_argv(ref, tiny_model, corpus_file)) == 0
    assert tensors(out / "records" / f"{HP0}.safetensors") == tensors(
        ref / "records" / f"{HP0}.safetensors")


def test_corpus_of_only_non_utf8_files(tmp_path: Path, tiny_model: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "bad"
    write_not_utf8(folder)
    out = tmp_path / "run"
    msg = one_line_error(capsys, record_argv(out, tiny_model, folder))
    assert "UTF-8" in msg and str(folder) in msg
    assert_no_output(out)


def test_ctx_len_longer_than_the_model_allows(tmp_path: Path, tiny_model: Path,
                                              corpus_file: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    n_positions = json.loads((tiny_model / "config.json").read_text())["n_positions"]
    out = tmp_path / "run"
    msg = one_line_error(capsys, record_argv(out, tiny_model, corpus_file, HP0,
                                             "--ctx-len", str(n_positions + 1)))
    assert f"--ctx-len {n_positions + 1}" in msg and str(n_positions) in msg
    assert_no_output(out)


@pytest.mark.parametrize("flag", ["--ctx-len", "--batch-size", "--max-tokens", "--n-top"])
def test_non_positive_sizes(flag: str, tmp_path: Path, tiny_model: Path, corpus_file: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    msg = one_line_error(capsys, record_argv(out, tiny_model, corpus_file, HP0, flag, "-1"))
    assert flag in msg
    assert_no_output(out)


@pytest.fixture(scope="module")
def nan_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """The tiny model with one MLP input column set to NaN: exactly one unit of layer 0 is NaN."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("nan-gpt2")
    for f in tiny_model.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, out / f.name)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    unit = 17
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[:, unit] = float("nan")  # Conv1D: [in, out]
    model.save_pretrained(out)
    return out, unit


def test_nan_activations_name_the_unit(tmp_path: Path, nan_model: tuple[Path, int],
                                       corpus_file: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    model, unit = nan_model
    out = tmp_path / "run"
    msg = one_line_error(capsys, record_argv(out, model, corpus_file))
    assert "NaN" in msg and f"{HP0} unit {unit}," in msg
    assert_no_output(out)


def test_output_folder_holding_a_different_run(tmp_path: Path, tiny_model: Path,
                                               corpus_file: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert cli.main(record_argv(out, tiny_model, corpus_file)) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    for extra in ([], ["--resume"]):
        msg = one_line_error(capsys, record_argv(out, tiny_model, corpus_file, HP0,
                                                 "--seed", "1", *extra))
        assert "different run" in msg and "seed" in msg and "--out" in msg
    msg = one_line_error(capsys, record_argv(out, tiny_model, corpus_file,
                                             "transformer.h.1.mlp.act", "--resume"))
    assert "different run" in msg and "hookpoints" in msg
    after = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before


def test_stages_need_a_recorded_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for stage in ("explain", "score"):
        msg = one_line_error(capsys, [stage, str(tmp_path / "nowhere")])
        assert "record" in msg
    assert not (tmp_path / "nowhere").exists()


def test_bad_units_spec(tmp_path: Path, tiny_model: Path, corpus_file: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert cli.main(record_argv(out, tiny_model, corpus_file)) == 0
    for spec, words in [("first:ten", "--units"), ("0-70", "out of range")]:
        msg = one_line_error(capsys, ["explain", str(out), "--units", spec])
        assert words in msg
        assert not (out / "explanations").exists()


def test_unknown_choice_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["explain", "somewhere", "--normalization", "round"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_debug_raises_with_the_traceback(tmp_path: Path, corpus_file: Path, tiny_model: Path,
                                         capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    argv = record_argv(out, tmp_path / "no-such-model", corpus_file)
    with pytest.raises(UserError, match="model path not found"):
        cli.main([*argv, "--debug"])
    assert_no_output(out)

    # An unexpected error: one line naming the type and --debug; the exception under --debug.
    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(record_mod, "record", broken)
    rc = cli.main(record_argv(out, tiny_model, corpus_file))
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert err.strip() == ("neuroscribe: error: RuntimeError: disk on fire "
                           "(rerun with --debug for the traceback)")
    with pytest.raises(RuntimeError, match="disk on fire"):
        cli.main([*record_argv(out, tiny_model, corpus_file), "--debug"])


# --- hub ids, offline, from a local hub cache ----------------------------------------------------


HUB_SCRIPT = textwrap.dedent("""
    import json, sys
    from neuroscribe.errors import UserError
    from neuroscribe.models import _split_model_spec, list_hookpoints, load_subject

    where, kwargs = _split_model_spec("org/tiny")
    subject = load_subject("org/tiny")
    result = {"where": where, "kwargs": kwargs, "n_positions": subject.max_context,
              "hookpoints": list_hookpoints(subject.model),
              "ids": subject.tokenizer("the cat sat")["input_ids"]}
    try:
        load_subject("org/unknown-model")
        result["unknown"] = None
    except UserError as e:
        result["unknown"] = str(e)
    print(json.dumps(result))
""")


def test_hub_id_loads_offline_from_the_hub_cache(tiny_model: Path, tmp_path: Path) -> None:
    """``org/name`` goes through from_pretrained's hub path, served from a local cache."""
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    home = tmp_path / "hf-home"
    repo = home / "hub" / "models--org--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", HUB_SCRIPT], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["where"] == "org/tiny" and result["kwargs"] == {}
    local = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert result["hookpoints"] == [n for n, _ in local.named_modules() if n]
    assert result["n_positions"] == local.config.n_positions
    assert result["ids"] == AutoTokenizer.from_pretrained(tiny_model)("the cat sat")["input_ids"]
    assert result["unknown"] is not None
    assert result["unknown"].startswith("could not load model 'org/unknown-model'")
    assert "\n" not in result["unknown"]
