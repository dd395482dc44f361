"""FIND's own benchmark layout as a suite (``bench-find --suite find:DIR``), and our
generated suites written in that layout.

FIND (multimodal-interpretability/FIND, ``src/find-dataset``) releases one folder per
function, ``fNNNNN/function_code.py`` defining ``function``, listed by a ``data.json``:

- numeric: ``data.json`` entries (``name``, ``dir``, ``domain``, ``corruption_type``,
  ``corruption_params`` {``std``: the noise's mean, ``boundary``}, ``noise_type``, ...);
  ``func_name_dict.json`` says which variant (clean, corrupted, noised, MLP) each folder's
  ``function_code.py`` is. The generator's own output (``meta/data.json``, and
  ``corrupted_function_code.py`` and ``noised_function_code.py`` beside each
  ``function_code.py``) is read too; ``--find-variant`` picks the file there;
- strings: entries ``{type, params, name, dir}``; FIND's release has no ``data.json`` for
  them, so ``unit_test_data.json`` lists them (``name`` is the folder) and gives each its
  ten (input, output) unit tests, which then score the answers, as FIND's evaluator does.

Only the folders an index lists are run, so a smaller ``data.json`` runs a subset. FIND's
code runs unchanged in the sandbox; neuroscribe only sets ``__file__`` (FIND's MLP functions
load their weights beside it) and appends ``f``, a float (or string) in and out. FIND's
entity and relation neurons query a Vicuna server and are refused with a clear error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from neuroscribe.errors import UserError

VARIANT_FILES = {"clean": "function_code.py", "corrupted": "corrupted_function_code.py",
                 "noised": "noised_function_code.py", "mlp": "load_mlp.py"}
STRING_ADAPTER = "\n\ndef f(x):\n    return function(str(x))\n\nf_truth = f\n"
NUMERIC_ADAPTER = "\n\nimport numpy as np\n{adapter}"


def _index(root: Path) -> tuple[list[dict[str, Any]], str]:
    for rel in ("data.json", "meta/data.json", "unit_test_data.json"):
        if (root / rel).is_file():
            data = json.loads((root / rel).read_text())
            if isinstance(data, dict):  # tolerate {"functions": [...]} or {dir: entry}
                data = data.get("functions") or list(data.values())
            return data, rel
    raise UserError(f"{root}: no data.json, meta/data.json or unit_test_data.json (FIND's "
                    "layout: one fNNNNN/ folder per function, listed by data.json)")


def _category(entry: dict[str, Any], index: str) -> str:
    if "concept1" in entry:
        return "entity"
    if index == "unit_test_data.json" or "corruption_type" not in entry and "domain" not in entry:
        return "string"
    return "numeric"


def _variant(root: Path, folder: Path, want: str) -> str:
    """Which variant a numeric folder's code is, and so which file to run."""
    names = root / "func_name_dict.json"
    if want == "released" and names.is_file():
        file = json.loads(names.read_text()).get(folder.name, "function_code.py")
        return next((k for k, v in VARIANT_FILES.items() if v == file), "clean")
    if want == "released":
        return "clean"
    if want not in VARIANT_FILES:
        raise UserError(f"--find-variant {want!r}: choose released, "
                        f"{', '.join(VARIANT_FILES)}")
    return want


def _numeric(entry: dict[str, Any], root: Path, folder: Path, variant: str) -> Any:
    from neuroscribe.find.function import FindFunction
    from neuroscribe.find.numeric import ADAPTER, EVAL_HI, EVAL_LO

    file = folder / VARIANT_FILES[variant]
    if not file.is_file() and variant != "clean" and (folder / "function_code.py").is_file():
        file = folder / "function_code.py"  # the released layout: one file, whichever variant
    interval, desc = None, str(entry.get("name", folder.name))
    if variant == "corrupted" and entry.get("corruption_params"):
        b = entry["corruption_params"]["boundary"]
        kind = entry.get("corruption_type", "interval_inside")
        interval = ([EVAL_LO, b[0]] if kind == "interval_smaller" else
                    [b[0], EVAL_HI] if kind == "interval_larger" else [b[0], b[-1]])
        desc += (f"; corrupted ({kind}, boundary {b}): there it returns noise around "
                 f"{entry['corruption_params'].get('std')}")
    elif variant == "noised":
        desc += f"; plus {entry.get('noise_type', 'random')} noise of scale 1"
    elif variant == "mlp":
        desc += "; approximated by an MLP"
    code = f"__file__ = {str(file.resolve())!r}\n{_read(file)}" + _truth_code(folder, file) + \
        NUMERIC_ADAPTER.format(adapter=ADAPTER)
    name = str(entry.get("name", ""))
    op = name.split("(")[0]
    op = f"{op.split(';')[-1]}:{';'.join(op.split(';')[:-1])}" if ";" in op else op
    return FindFunction(folder.name, "numeric", op or "unknown", desc,
                        f"FIND's domain {entry.get('domain')}", code,
                        {"variant": variant, "find_entry": entry}, interval)


def _truth_code(folder: Path, file: Path) -> str:
    """FIND's evaluator scores against the folder's ``function_code.py`` (the clean
    function) whichever variant the agent called: run it in its own namespace as
    ``_truth_function``, unchanged."""
    clean = folder / "function_code.py"
    if file == clean or not clean.is_file():
        return ""
    return (f"\n\n_truth_ns = {{'__file__': {str(clean.resolve())!r}, "
            "'__name__': 'find_truth'}\n"
            f"exec(compile({_read(clean)!r}, {str(clean.resolve())!r}, 'exec'), _truth_ns)\n"
            "_truth_function = _truth_ns['function']\n")


def _string(entry: dict[str, Any], root: Path, folder: Path,
            tests: dict[str, Any], descriptions: dict[str, str]) -> Any:
    from neuroscribe.find.function import FindFunction

    file = folder / "function_code.py"
    name = str(entry.get("name") if "type" in entry else folder.name)
    t = tests.get(folder.name)
    pairs = None
    if t:  # FIND scores only each item's correct pair (correct_inx is 1-based)
        pairs = [[ins[c - 1], outs[c - 1]] for (ins, outs), c in
                 zip(t["test_vec"], _ints(t["correct_inx"]))]
    desc = descriptions.get(folder.name) or name
    op = name.split("(")[0] if "(" in name else "find"
    return FindFunction(folder.name, "string", op, desc, "strings",
                        f"__file__ = {str(file.resolve())!r}\n{_read(file)}{STRING_ADAPTER}",
                        {"find_entry": entry, **({"unit_tests": pairs} if pairs else {})})


def _ints(v: Any) -> list[int]:
    return [int(c) for c in (v if isinstance(v, list) else [v] * 10)]


def _read(file: Path) -> str:
    if not file.is_file():
        raise UserError(f"{file}: listed by the index but missing")
    return file.read_text()


def load_find_dir(path: str | Path, variant: str = "released") -> list[Any]:
    """The functions that FIND's index in ``path`` lists, as ``FindFunction``s."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"find:{path}: not a folder")
    entries, index = _index(root)
    tests = {}
    if (root / "unit_test_data.json").is_file():
        tests = {t["name"]: t for t in json.loads((root / "unit_test_data.json").read_text())}
    descriptions = {}
    if (root / "test_data.json").is_file():
        descriptions = {d["name"]: d.get("description", "").lstrip(": ").strip()
                        for d in json.loads((root / "test_data.json").read_text())}
    out = []
    for entry in entries:
        folder = root / Path(str(entry.get("dir") or entry.get("name"))).name
        cat = _category(entry, index)
        if cat == "entity":
            raise UserError(f"{folder}: FIND's entity and relation neurons query a Vicuna "
                            "server from their code; neuroscribe runs FIND's numeric and "
                            "string functions (use the generated suite's entity category)")
        if cat == "numeric":
            out.append(_numeric(entry, root, folder, _variant(root, folder, variant)))
        else:
            out.append(_string(entry, root, folder, tests, descriptions))
    if not out:
        raise UserError(f"{root / index}: lists no functions")
    return out


HEADER = ("import numpy as np\nimport scipy.signal\nimport sys\n"
          "from scipy.special import gamma, factorial, erf\n\n\n")
MAIN = """
if __name__ == '__main__':
    outputs = ''
    for arg in sys.argv[1:]:
        x = float(arg)
        try:
            out = function(x)
        except:
            out = 'None'
        outputs += f'({arg}, {out}) '
    print(f'Function input - output pairs: {outputs}')
"""


def write_find_dir(fns: list[Any], path: str | Path) -> Path:
    """Our generated numeric functions in FIND's released layout (``data.json``,
    ``func_name_dict.json``, ``fNNNNN/function_code.py``), so FIND's own scripts and
    ``find:DIR`` read them."""
    root = Path(path)
    entries, names = [], {}
    for k, fn in enumerate(f for f in fns if f.category == "numeric" and "name" in f.params):
        d = f"f{k:05d}"
        (root / d).mkdir(parents=True, exist_ok=True)
        seed = next(line for line in fn.code.splitlines() if line.startswith("_rs ="))
        p = fn.params
        files = {"function_code.py": _body(fn.code, "_truth_function" if p["variant"] !=
                                           "clean" else "function")}
        files[VARIANT_FILES[p["variant"]]] = _body(fn.code, "function")
        for name, body in files.items():  # FIND's layout: the clean one is function_code.py
            (root / d / name).write_text(f"{HEADER}{seed}\n\ndef function(x):{body}\n{MAIN}")
        names[d] = VARIANT_FILES[p["variant"]]
        entries.append({"type": "simple" if len(p["families"]) == 1 else p["families"][0],
                        "params": p["params"], "name": p["name"], "dir": d,
                        "corruption_type": p.get("corruption_type"),
                        "corruption_params": p.get("corruption_params"),
                        "domain": p["domain"], "noise_type": p.get("noise_type"),
                        "noise_params": p.get("noise_params"), "neuroscribe_id": fn.id})
    root.mkdir(parents=True, exist_ok=True)
    (root / "data.json").write_text(json.dumps(entries, indent=1))
    (root / "func_name_dict.json").write_text(json.dumps(names, indent=1))
    return root


def _body(code: str, name: str) -> str:
    """The body of ``def name(x):`` in a generated function's code."""
    return code.split(f"def {name}(x):", 1)[1].split("\n\n", 1)[0].rstrip()
