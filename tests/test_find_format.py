"""FIND's own layout as a suite (``bench-find --suite find:DIR``), on functions written in
FIND's format: by FIND's code templates (hand-written here), by our generator's
``write_find_dir``, and an MLP function saved as FIND saves them."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from neuroscribe.errors import UserError
from neuroscribe.find.dir import load_find_dir, write_find_dir
from neuroscribe.find.eval import Evaluator, FindConfig
from neuroscribe.find.function import eval_points
from neuroscribe.find.suite import SuiteConfig, make_suite
from neuroscribe.sandbox import SandboxConfig, Worker, run_code

HEADER = ("import numpy as np\nimport scipy.signal\nimport sys\n"
          "from scipy.special import gamma, factorial, erf\n\n\n")
MAIN = ("\nif __name__ == '__main__':\n    outputs = ''\n    for arg in sys.argv[1:]:\n"
        "        x = float(arg)\n        try:\n            out = function(x)\n        except:\n"
        "            out = 'None'\n        outputs += f'({arg}, {out}) '\n"
        "    print(f'Function input - output pairs: {outputs}')\n")
# FIND's writer's output for a corrupted sine and a noised logarithm (write_source_code.py)
CORRUPTED = ("def function(x):\n    if type(x) == int or type(x) == float:\n"
             "        x = np.array(x)\n    return np.where(x > 77.7, -9.6 * np.sin((2 * np.pi / "
             "4.5)*(x-0.2)) + 9.8, np.random.normal(loc=9.805,scale=0.1, size=x.shape))\n")
CLEAN_SIN = ("def function(x):\n\n        return -9.6 * np.sin((2 * np.pi / 4.5)*(x-0.2)) + 9.8"
             "\n")
LOG = "def function(x):\n\n        return 2.0*(np.log(x) / np.log(3.0)) + 1.0\n"


def find_dir(root: Path) -> Path:
    entries = [
        {"type": "simple", "params": [-9.6, 4.5, 0.2, 9.8], "name": "sin((-9.6, 4.5, 0.2, 9.8))",
         "dir": "f00000", "corruption_type": "interval_smaller",
         "corruption_params": {"std": 9.805, "boundary": [77.7]}, "domain": [-100, 100],
         "noise_type": "normal", "noise_params": 1},
        {"type": "simple", "params": [2.0, 1.0, 3.0], "name": "logarithm((2.0, 1.0, 3.0))",
         "dir": "/some/absolute/path/f00001", "corruption_type": "interval_inside",
         "corruption_params": {"std": 1.0, "boundary": [10.0, 20.0]}, "domain": [1, 100],
         "noise_type": "uniform", "noise_params": 1},
        {"type": "simple", "params": [1.0, 0.0], "name": "linear((1.0, 0.0))", "dir": "f00002",
         "corruption_type": "interval_larger", "domain": [-100, 100],
         "corruption_params": {"std": 0.0, "boundary": [50.0]}, "noise_type": "normal",
         "noise_params": 1}]
    for d, body in (("f00000", CORRUPTED), ("f00001", LOG), ("f00002", "def function(x):\n"
                                                                 "    return 1.0*x + 0.0\n")):
        (root / d).mkdir(parents=True)
        (root / d / "function_code.py").write_text(HEADER + body + MAIN)
    # as FIND's generator writes a folder: function_code.py is the clean function, and the
    # variant the agent calls sits beside it (func_name_dict.json names it)
    (root / "f00000" / "function_code.py").write_text(HEADER + CLEAN_SIN + MAIN)
    (root / "f00000" / "corrupted_function_code.py").write_text(HEADER + CORRUPTED + MAIN)
    (root / "data.json").write_text(json.dumps(entries[:2]))  # f00002 is not listed
    (root / "func_name_dict.json").write_text(json.dumps(
        {"f00000": "corrupted_function_code.py", "f00001": "function_code.py",
         "f00002": "function_code.py"}))
    return root


def truth_in_sandbox(fns: list, xs: list[float], entry: str = "f_truth") -> list[list]:
    from neuroscribe.find.report import preloads

    with Worker(SandboxConfig(timeout=30), {"NEUROSCRIBE_PRELOAD": preloads(fns)}) as w:
        return [w.call(f.code, xs, entry).outputs for f in fns]


def test_finds_layout_runs_the_listed_folders_with_category_variant_and_interval(
        tmp_path: Path) -> None:
    fns = load_find_dir(find_dir(tmp_path))
    assert [f.id for f in fns] == ["f00000", "f00001"]  # only data.json's, matched by dir
    sin, log = fns
    assert sin.category == log.category == "numeric" and sin.op == "sin"
    assert sin.params["variant"] == "corrupted" and sin.interval == [-128.0, 77.7]
    assert log.params["variant"] == "clean" and log.interval is None  # clean: no interval
    xs = [0.5, 80.5, -3.5]
    ys_sin, ys_log = truth_in_sandbox(fns, xs, "f")  # what the agent calls
    # interval_smaller corrupts x <= 77.7 (FIND's naming): noise around the mean there
    assert ys_sin[1] == pytest.approx(-9.6 * math.sin(2 * math.pi / 4.5 * 80.3) + 9.8)
    assert abs(ys_sin[0] - 9.805) < 0.6 and abs(ys_sin[2] - 9.805) < 0.6
    assert ys_sin[0] != pytest.approx(-9.6 * math.sin(2 * math.pi / 4.5 * 0.3) + 9.8)
    # what FIND's mse_indicator.py scores against: function_code.py, the clean sine
    clean = truth_in_sandbox(fns, xs)[0]
    assert clean == pytest.approx([-9.6 * math.sin(2 * math.pi / 4.5 * (x - 0.2)) + 9.8
                                   for x in xs])
    assert ys_log[0] == pytest.approx(2 * math.log(0.5) / math.log(3) + 1)
    assert ys_log[2] is None  # log of a negative: NaN, sent back as no value


def test_the_metric_skips_nan_truth_and_scores_like_finds(tmp_path: Path) -> None:
    from neuroscribe.find.agents import Answer

    log = load_find_dir(find_dir(tmp_path))[1]
    ev = Evaluator(FindConfig(), lambda f, xs: truth_in_sandbox([f], xs)[0],
                   lambda code, xs: run_code(code, xs))
    exact = Answer("log base 3", "import math\ndef f(x):\n    return 2.0 * math.log(abs(x)) / "
                   "math.log(3.0) + 1.0\n")
    m = ev.score(log, exact)
    assert m["solved"] and m["nmse"] < 1e-12 and m["points"] == 128  # x < 0 skipped
    off = Answer("off by one", "import math\ndef f(x):\n    return 2.0 * math.log(abs(x)) / "
                 "math.log(3.0) + 2.0\n")
    xs = [x for x in eval_points() if x > 0]
    t = [2 * math.log(x) / math.log(3) + 1 for x in xs]
    want = len(xs) / sum(v * v for v in t)  # FIND: sum of squared errors / sum of squares
    assert ev.score(log, off)["nmse"] == pytest.approx(want, rel=1e-9)


def test_a_corrupted_function_is_scored_against_its_clean_function_code(
        tmp_path: Path) -> None:
    """FIND's evaluator loads ``function_code.py`` whichever variant the agent called: the
    clean sine scores 0, and coding the corruption in costs FIND's NMSE."""
    from neuroscribe.find.agents import Answer

    sin = load_find_dir(find_dir(tmp_path))[0]
    ev = Evaluator(FindConfig(), lambda f, xs, entry="f_truth": truth_in_sandbox([f], xs,
                                                                                 entry)[0],
                   lambda code, xs: run_code(code, xs))
    body = "-9.6 * math.sin((2 * math.pi / 4.5) * (x - 0.2)) + 9.8"
    clean = ev.score(sin, Answer("sine", f"import math\ndef f(x):\n    return {body}\n",
                                 [-128.0, 77.7]))
    assert clean["solved"] and clean["nmse"] < 1e-12 and clean["iou"] == 1.0
    assert clean["nmse_released"] > 0.1  # against the corrupted variant it is far off
    coded = ev.score(sin, Answer("sine, 9.805 below 77.7", "import math\ndef f(x):\n"
                                 f"    return 9.805 if x <= 77.7 else {body}\n"))
    xs = eval_points()
    t = [-9.6 * math.sin(2 * math.pi / 4.5 * (x - 0.2)) + 9.8 for x in xs]
    want = sum((v - 9.805) ** 2 for x, v in zip(xs, t) if x <= 77.7) / sum(v * v for v in t)
    assert coded["nmse"] == pytest.approx(want, rel=1e-9) and coded["nmse_released"] < 0.01


def test_generated_suite_round_trips_through_finds_layout(tmp_path: Path) -> None:
    fns = [f for f in make_suite(replace(SuiteConfig(n_numeric=12, n_string=0, n_entity=0,
                                                     puzzles=""), seed=3))]
    write_find_dir(fns, tmp_path / "find")
    back = load_find_dir(tmp_path / "find")
    assert len(back) == 12
    assert [b.params["variant"] for b in back] == [f.params["variant"] for f in fns]
    assert [b.interval for b in back] == [f.interval for f in fns]
    xs = eval_points()[::16]
    assert truth_in_sandbox(back, xs) == truth_in_sandbox(fns, xs)
    entry = json.loads((tmp_path / "find" / "data.json").read_text())[0]
    assert entry["name"] == fns[0].params["name"] and entry["dir"] == "f00000"


def test_finds_string_functions_are_scored_by_their_unit_tests(tmp_path: Path) -> None:
    from neuroscribe.find.agents import Answer

    (tmp_path / "f00001").mkdir()
    (tmp_path / "f00001" / "function_code.py").write_text(
        "import numpy as np\nimport sys\n\n\ndef function(string):\n\n    new_string = 'lvmBi'\n"
        "\n    return string + new_string\n")
    tests = [{"name": "f00001", "correct_inx": [2] * 10,
              "test_vec": [[["a", f"w{i}", "c"], ["x", f"w{i}lvmBi", "y"]] for i in range(10)]}]
    (tmp_path / "unit_test_data.json").write_text(json.dumps(tests))
    (fn,) = load_find_dir(tmp_path)
    assert fn.category == "string" and fn.params["unit_tests"][0] == ["w0", "w0lvmBi"]
    ev = Evaluator(FindConfig(), lambda f, xs: [], lambda code, xs: run_code(code, xs))
    right = Answer("appends lvmBi", "def f(x):\n    return x + 'lvmBi'\n")
    wrong = Answer("appends lvm", "def f(x):\n    return x + 'lvm'\n")
    assert ev.score(fn, right)["exact_match"] == 1.0 and ev.score(fn, right)["solved"]
    assert ev.score(fn, wrong)["exact_match"] == 0.0


def test_finds_mlp_functions_run_with_torch_and_cpu_weights(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    d = tmp_path / "f00000"
    d.mkdir()
    net = torch.nn.Module()  # FIND's MLP: its layers under "layers"
    net.layers = torch.nn.Sequential(torch.nn.Linear(1, 64), torch.nn.ReLU(),
                                     torch.nn.Linear(64, 1))
    torch.save(net.state_dict(), d / "mlp_approx_model.pt")
    (d / "function_code.py").write_text(
        "import torch\nimport torch.nn as nn\nimport sys\nimport os\n"
        "dir_path = os.path.dirname(os.path.abspath(__file__))\n\nclass MLP(nn.Module):\n"
        "    def __init__(self):\n        super(MLP, self).__init__()\n"
        "        self.layers = nn.Sequential(nn.Linear(1, 64), nn.ReLU(), nn.Linear(64, 1))\n\n"
        "    def forward(self, x):\n        return self.layers(x)\n\ndef function(x):\n"
        "    model = MLP()\n    model.load_state_dict(torch.load(os.path.join(dir_path, "
        "'mlp_approx_model.pt')))\n    model.eval()\n"
        "    return model(torch.tensor(x).reshape(-1, 1).float()).item()\n")
    (tmp_path / "data.json").write_text(json.dumps([{"type": "simple", "params": [1.0, 0.0],
                                                     "name": "linear((1.0, 0.0))", "dir": "f00000",
                                                     "domain": [-100, 100]}]))
    (tmp_path / "func_name_dict.json").write_text(json.dumps({"f00000": "load_mlp.py"}))
    (fn,) = load_find_dir(tmp_path)
    assert fn.params["variant"] == "mlp"
    from neuroscribe.find.report import function_folders

    assert function_folders([fn]) == (str(d.resolve()),)  # bound read-only into the sandbox
    with Worker(SandboxConfig(timeout=60, memory_mb=0), {"NEUROSCRIBE_PRELOAD": "torch"},
                startup_timeout=120, ro_binds=function_folders([fn])) as w:
        r = w.call(fn.code, [2.5], "f_truth")
    with torch.no_grad():
        want = net.layers(torch.tensor([[2.5]])).item()
    assert r.ok and r.outputs[0] == pytest.approx(want, rel=1e-6)


def test_finds_entity_neurons_and_a_bad_folder_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no data.json"):
        load_find_dir(tmp_path)
    (tmp_path / "data.json").write_text(json.dumps([{"dir": "f00000", "concept1": "ships"}]))
    with pytest.raises(UserError, match="Vicuna"):
        load_find_dir(tmp_path)
    (tmp_path / "data.json").write_text(json.dumps([{"dir": "f00009", "name": "x((1,))",
                                                     "domain": [-1, 1]}]))
    with pytest.raises(UserError, match="missing"):
        load_find_dir(tmp_path)


def test_bench_find_runs_a_find_folder_end_to_end(tmp_path: Path) -> None:
    from neuroscribe.find.cli import bench_find
    from neuroscribe.llm.client import LLMConfig

    root = find_dir(tmp_path / "find")
    (root / "data.json").write_text(json.dumps(json.loads((root / "data.json").read_text())[:1]))
    cfg = FindConfig(out=str(tmp_path / "run"), suite=f"find:{root}")
    report = bench_find(cfg, SuiteConfig(), LLMConfig())
    (row,) = report["results"]
    assert row["id"] == "f00000" and row["solved"] and row["iou"] > 0.9, row


def test_offline_string_search_solves_finds_compositions_on_held_out_inputs() -> None:
    """FIND's families, composed, with parameters read off the outputs (a replaced letter,
    a shift, an index): the found code agrees with the function on inputs it never saw."""
    from neuroscribe.find.string_search import PROBES, search, steps_answer
    from neuroscribe.find.strings import build_code

    for steps in ([("remove_substring", {"c": "a"}), ("subtract_number_to_string", {"n": 3})],
                  [("replace_substring", {"old": "o", "new": "Q"}),
                   ("reverse_string", {})]):
        ns: dict = {}
        exec(build_code(steps), ns)  # noqa: S102 - our own families
        found = search(PROBES, [ns["f"](p) for p in PROBES])
        assert found is not None
        ns2: dict = {}
        exec(steps_answer(found)[0], ns2)  # noqa: S102
        for x in ["held out words", "Another Test 99", "qwerty banana"]:
            assert ns2["f"](x) == ns["f"](x)


def test_rescore_scores_saved_answers_with_this_evaluator_without_running_agents(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After an evaluator fix (FIND's clean-function truth), saved answers are scored again;
    no agent runs, and a changed generator is refused."""
    from neuroscribe.find import report as report_mod
    from neuroscribe.find.cli import bench_find
    from neuroscribe.llm.client import LLMConfig

    scfg = SuiteConfig(n_numeric=2, n_string=0, n_entity=0, puzzles="", seed=5)
    cfg = FindConfig(out=str(tmp_path / "run"))
    first = bench_find(cfg, scfg, LLMConfig())
    path = tmp_path / "run" / "answers" / "offline" / "numeric-0000.json"
    rec = json.loads(path.read_text())
    rec.update(solved=not rec["solved"], nmse=123.0)  # as if an older evaluator had said so
    path.write_text(json.dumps(rec))

    async def no_agent(*a: object, **k: object) -> None:
        raise AssertionError("an agent ran")

    monkeypatch.setattr(report_mod, "solve_one", no_agent)
    again = bench_find(cfg, scfg, LLMConfig(), resume=True, rescore=True)
    assert [r["solved"] for r in again["results"]] == [r["solved"] for r in first["results"]]
    assert json.loads(path.read_text())["nmse"] == first["results"][0]["nmse"]
    suite = json.loads((tmp_path / "run" / "suite.json").read_text())
    suite["functions"][0]["params"]["params"] = [[9.9, 9.9]]
    (tmp_path / "run" / "suite.json").write_text(json.dumps(suite))
    with pytest.raises(UserError, match="other functions"):
        bench_find(cfg, scfg, LLMConfig(), resume=True, rescore=True)
