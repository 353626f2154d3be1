"""The shape the code keeps so that it reads in one sitting: line budgets, and no function
below `main` that reads the argparse namespace (a function takes the values it uses)."""
import ast
import os

import pytest

from conftest import ROOT

SCRIPTS = ["nanosft.py", "pretrain.py", "finetune.py", "dpo.py", "extras/dpo_eval.py", "extras/peft.py", "sample.py",
           "extras/bench.py", "extras/experiments.py", "extras/export.py", "extras/hf.py", "data/formats.py",
           "data/world_eval.py", "extras/rewind.py", "extras/sft_eval.py", "extras/replay.py"]
LINES = {"nanosft.py": 900, "finetune.py": 350, "dpo.py": 400}  # the files' budgets
MAIN_LINES = 80


def functions(path):
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read())
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


@pytest.mark.parametrize("path,limit", LINES.items())
def test_file_budgets(path, limit):
    with open(os.path.join(ROOT, path)) as f:
        assert sum(1 for _ in f) <= limit


@pytest.mark.parametrize("path", SCRIPTS)
def test_main_fits_and_only_main_reads_the_flags(path):
    for fn in functions(path):
        if fn.name == "main":
            assert fn.end_lineno - fn.lineno + 1 <= MAIN_LINES, f"{path}: main has {fn.end_lineno - fn.lineno + 1} lines"
        elif fn.name != "parse_args":
            names = [a.arg for a in fn.args.args + fn.args.kwonlyargs]
            assert "args" not in names, f"{path}:{fn.lineno}: {fn.name} takes the argparse namespace"


def test_gpt_forward_is_short():
    forward = [fn for fn in functions("nanosft.py") if fn.name == "forward"]
    assert max(fn.end_lineno - fn.lineno + 1 for fn in forward) <= 30
