"""The reading path: the top level the design card names, the core importing nothing from
extras/ at module level, no import cycles, and README's "How to read this" pointing at the
lines it names. What a default run executes is counted in tests/test_default_run.py."""
import ast
import os
import subprocess

import pytest

from conftest import ROOT

TOP_LEVEL = {"README.md", "requirements.txt", "nanosft.py", "pretrain.py", "finetune.py", "dpo.py", "sample.py",
             "data", "tests", "docs", "extras", ".ci", ".gitignore"}
CORE = ["nanosft.py", "pretrain.py", "finetune.py", "dpo.py"]
SHARED = {"ns": "nanosft.py", "nanosft": "nanosft.py", "formats": "data/formats.py", "world_eval": "data/world_eval.py",
          "world_qa": "data/world_qa.py", "corpus": "data/corpus.py", "preferences": "data/preferences.py",
          "world": "data/world.py"}


def tree(path):
    with open(os.path.join(ROOT, path)) as f:
        return ast.parse(f.read())


def tracked_top_level():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return {line.split("/")[0] for line in out.splitlines() if line}


def test_top_level_is_the_design_cards():
    assert tracked_top_level() <= TOP_LEVEL


def module_level_imports(node):
    """Import statements outside any function or class body (an `if` at module level counts)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        yield from module_level_imports(child)


def imported(node):
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    return [f"{base}.{a.name}" if base else a.name for a in node.names]


@pytest.mark.parametrize("path", CORE)
def test_core_imports_no_extra_at_module_level(path):
    bad = [name for node in module_level_imports(tree(path)) for name in imported(node)
           if name.split(".")[0] == "extras"]
    assert not bad, f"{path} imports {bad} at module level"


def project_modules():
    files = [f for f in os.listdir(ROOT) if f.endswith(".py")]
    files += [f"{d}/{f}" for d in ("data", "extras") for f in os.listdir(os.path.join(ROOT, d)) if f.endswith(".py")]
    return {f[:-3].replace("/", ".").removesuffix(".__init__"): f for f in files}


def test_no_import_cycles():
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in module_level_imports(tree(path)):  # (deferred imports run after both modules load)
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported(node):
                    while target and target not in modules:  # "extras.peft.add_lora" -> "extras.peft"
                        target = target.rpartition(".")[0]
                    if target and target != name and modules[target] != modules[name]:
                        deps.add(target)
        graph[name] = deps

    def visit(node, stack):
        assert node not in stack, "import cycle: " + " -> ".join([*stack, node])
        for dep in graph.get(node, ()):
            visit(dep, [*stack, node])
    for name in graph:
        visit(name, [])


def test_readme_opens_with_how_to_read_this_and_its_line_ranges_are_true():
    """README's reading order names each stage's core idea by its lines: a definition
    (`NAME`, lines A-B: exactly its def or class) or the stage's loop (`main`, lines A-B:
    from the '# ---- train' comment to the final on_eval). Stale numbers fail here."""
    import re
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert len(readme.encode()) <= 15_000
    headings = re.findall(r"^## (.+)$", readme, flags=re.M)
    assert headings[0] == "How to read this"
    section = readme.split("## How to read this", 1)[1].split("\n## ", 1)[0]
    rows, current = [], None
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and "lines" in cells[3]:
            current = cells[1].strip("`") or current
            name, first, last = re.match(r"`(\w+)`, lines (\d+)–(\d+)", cells[3]).groups()
            rows.append((current, name, int(first), int(last)))
    assert {r[0] for r in rows} == {"nanosft.py", "pretrain.py", "finetune.py", "dpo.py"}
    for path, name, first, last in rows:
        with open(os.path.join(ROOT, path)) as f:
            text = f.read().splitlines()
        if name == "main":
            assert text[first - 1].strip().startswith("# ---- train"), (path, first)
            assert text[last - 1].strip() == "on_eval(step)", (path, last)
        else:
            node = next(n for n in ast.walk(tree(path)) if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                        and n.name == name)
            assert (node.lineno, node.end_lineno) == (first, last), (path, name)
        assert last - first < (90 if name == "main" else 60), "a core idea that fits a screen or so"


FORMATTED = ["nanosft.py", "pretrain.py", "finetune.py", "dpo.py", "data/corpus.py", "data/formats.py",
             "data/preferences.py", "data/world_eval.py", "data/world_qa.py"]


@pytest.mark.parametrize("path", FORMATTED)
def test_what_a_default_run_executes_is_not_crammed(path):
    """Lines of at most 100 characters and no `;` joins (.ci/run also checks `ruff format`):
    an executed-lines count cannot be won by packing statements together."""
    import io
    import tokenize
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    assert max(len(line) for line in text.splitlines()) <= 100
    joins = [t.start[0] for t in tokenize.generate_tokens(io.StringIO(text).readline)
             if t.type == tokenize.OP and t.string == ";"]
    assert not joins, f"{path}: statements joined by ';' on lines {joins}"
