"""The shape the code keeps so that it reads in one sitting: line budgets, and no function
below `main` that reads the argparse namespace (a function takes the values it uses)."""
import ast
import importlib
import os

import pytest

from conftest import ROOT

SCRIPTS = ["nanosft.py", "pretrain.py", "finetune.py", "dpo.py", "extras/dpo_eval.py", "extras/peft.py", "sample.py",
           "extras/bench.py", "extras/experiments.py", "extras/export.py", "extras/hf.py", "extras/packing.py",
           "extras/cpu.py", "extras/charts.py", "data/formats.py", "data/world_eval.py", "data/world_qa.py",
           "data/corpus.py", "data/preferences.py", "extras/rewind.py",
           "extras/replay.py", "extras/runtime.py", "extras/own_data.py", "extras/flags.py", "extras/cross_domain.py"]
MAIN_LINES = 80  # a stage's main, which owns its loop: STAGE_MAIN_LINES
STAGE_MAIN_LINES = 250  # (formatted by ruff at 100 columns: one argument a line)


def functions(path):
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read())
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


@pytest.mark.parametrize("path", SCRIPTS)
def test_main_fits_and_only_main_reads_the_flags(path):
    for fn in functions(path):
        if fn.name == "main":
            most = STAGE_MAIN_LINES if path in ("pretrain.py", "finetune.py", "dpo.py") else MAIN_LINES
            assert fn.end_lineno - fn.lineno + 1 <= most, f"{path}: main has {fn.end_lineno - fn.lineno + 1} lines"
        elif fn.name != "parse_args":
            names = [a.arg for a in fn.args.args + fn.args.kwonlyargs]
            assert "args" not in names, f"{path}:{fn.lineno}: {fn.name} takes the argparse namespace"


def test_gpt_forward_is_short():
    forward = [fn for fn in functions("nanosft.py") if fn.name == "forward"]
    assert max(fn.end_lineno - fn.lineno + 1 for fn in forward) <= 25


def test_gpt_forward_takes_tokens_targets_cache_and_reduction_only():
    """Features (prompt tuning, packed rows, last-position decoding) extend the model from
    outside (extras/peft.py, extras/packing.py, GPT.hidden + lm_head), not through flags."""
    gpt = next(n for n in ast.walk(ast.parse(open(os.path.join(ROOT, "nanosft.py")).read()))
               if isinstance(n, ast.ClassDef) and n.name == "GPT")
    forward = next(n for n in gpt.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    names = [a.arg for a in forward.args.args + forward.args.kwonlyargs]
    assert names == ["self", "idx", "targets", "cache", "reduction"]
    assert not forward.args.vararg and not forward.args.kwarg


def project_modules():
    """{dotted name: path} of every module of the project (top level, data/, extras/)."""
    out = {}
    for folder in ("", "data", "extras"):
        for name in sorted(os.listdir(os.path.join(ROOT, folder or "."))):
            if name.endswith(".py") and name != "__init__.py":
                out[(folder + "." if folder else "") + name[:-3]] = os.path.join(ROOT, folder, name)
    return out


def imports(path, modules):
    """{each project module the file imports anywhere (at its top level or deferred, inside a
    function or block): True if it is never imported at the top level}. A deferred import of
    an extra by the core (nanosft.py, data/) is where a flag is handled, and is left out: it
    runs only after both modules are loaded."""
    with open(path) as f:
        tree = ast.parse(f.read())
    top = {id(n) for n in tree.body}
    found = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            names = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
            names = [n.module] + [f"{n.module}.{a.name}" for a in n.names]
        else:
            continue
        core = not path.startswith(os.path.join(ROOT, "extras"))
        for name in names:
            if name in modules and not (core and name.startswith("extras") and id(n) not in top):
                found[name] = found.get(name, True) and id(n) not in top
    return found


def test_every_module_imports_and_none_imports_one_that_imports_it_back():
    modules = project_modules()
    for name in modules:
        importlib.import_module(name)
    graph = {name: imports(path, modules) for name, path in modules.items()}
    edges = {(m, n) for m, targets in graph.items() for n in targets}
    reach = {m: {n for n in modules if (m, n) in edges} for m in modules}
    changed = True
    while changed:  # the transitive closure: every module each module leads to
        changed = False
        for m in modules:
            more = set().union(*(reach[n] for n in reach[m])) - reach[m]
            if more:
                reach[m] |= more
                changed = True
    cycles = sorted(m for m in modules if m in reach[m])
    assert not cycles, f"import cycles through {cycles}"


READ = ["nanosft.py", "pretrain.py", "finetune.py", "dpo.py", "sample.py", "data/formats.py", "data/world_eval.py",
        "data/world_qa.py", "data/corpus.py", "data/preferences.py", "data/world.py"]


@pytest.mark.parametrize("path", READ)
def test_calls_of_more_than_four_arguments_name_them(path):
    """A call with more than four arguments passes them by keyword beyond the fourth, so a
    reader never counts positions (min and max, whose arguments are all alike, aside)."""
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read())
    long = [f"line {n.lineno}: {ast.unparse(n)[:60]}" for n in ast.walk(tree)
            if isinstance(n, ast.Call) and len(n.args) > 4 and not (isinstance(n.func, ast.Name) and n.func.id in ("min", "max"))]
    assert not long, long
