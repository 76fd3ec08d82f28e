"""The house rules of docs/DESIGN.md, read from the source with `ast` (nothing is imported or run):

- serve/ and eval/ never import train/, directly or through other package modules;
- the package never imports a top-level script (template.py, supervised_finetuning.py, ...);
- package modules stay under ~400 lines and the scripts' main() under ~80;
- docs/DESIGN.md's layout names every package module and every script, each in its folder;
- a test module imports shared test code only from tests/helpers.py (fixtures come from tests/conftest.py).
"""

import ast
import re

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "medicalgpt"
MODULE_LINES = 400
MAIN_LINES = 80
# Modules allowed over the limit: {name: (lines, why)}. Keep it empty: split a module rather than list it.
LARGE_MODULES = {}
# Test modules that still import from another test module: {importer: imported}. Move the shared piece into
# tests/helpers.py and drop the entry.
TEST_IMPORTS_TO_MOVE = {
    "tests.train.test_losses": "tests.train.test_packing",  # tokenised(): issue 17's files, being edited meanwhile
}


def module_name(path):
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules():
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def scripts():
    return sorted(REPO.glob("*.py"))


def imported_names(path, name):
    """Every module `path` imports, anywhere in it (function-level imports included), as dotted names; `from a
    import b` counts `a` and `a.b`, since b may be a submodule. Relative imports are resolved against `name`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def package_imports(modules):
    """module -> the package modules it imports, with the packages above them (importing a.b.c runs a and a.b)."""
    graph = {}
    for name, path in modules.items():
        found = set()
        for imported in imported_names(path, name):
            parts = imported.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in modules)
        graph[name] = found - {name}
    return graph


def reachable(graph, start):
    """The modules importing `start` runs, with the chain that first reaches each: {module: [start, ..., module]}."""
    chains, todo = {start: [start]}, [start]
    while todo:
        current = todo.pop()
        for nxt in sorted(graph[current]):
            if nxt not in chains:
                chains[nxt] = chains[current] + [nxt]
                todo.append(nxt)
    return chains


def test_serving_and_evaluation_never_import_training():
    modules = package_modules()
    graph = package_imports(modules)
    offenders = []
    for name in modules:
        if name.startswith(("medicalgpt.serve", "medicalgpt.eval")):
            for target, chain in reachable(graph, name).items():
                if target == "medicalgpt.train" or target.startswith("medicalgpt.train."):
                    offenders.append(" -> ".join(chain))
    assert not offenders, "serve/ and eval/ must not import train/:\n" + "\n".join(sorted(set(offenders)))


def test_the_package_never_imports_a_top_level_script():
    script_names = {path.stem for path in scripts()}
    offenders = [
        f"{name} imports {imported}"
        for name, path in package_modules().items()
        for imported in imported_names(path, name)
        if imported.split(".")[0] in script_names
    ]
    assert not offenders, "\n".join(offenders)


def test_the_rule_checker_sees_imports_through_other_modules(tmp_path):
    """The checker itself: a chain a -> b -> c through a function-level import is found."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from c import g\n")
    (tmp_path / "c.py").write_text("g = 1\n")
    modules = {name: tmp_path / f"{name}.py" for name in "abc"}
    graph = {name: {m for m in imported_names(path, name) if m in modules} for name, path in modules.items()}
    assert reachable(graph, "a")["c"] == ["a", "b", "c"]


@pytest.mark.parametrize("name", sorted(package_modules()))
def test_package_modules_stay_readable(name):
    lines = len(package_modules()[name].read_text(encoding="utf-8").splitlines())
    limit = LARGE_MODULES.get(name, (MODULE_LINES,))[0]
    assert lines <= limit, f"{name} has {lines} lines (at most {limit}): split it by concern"


@pytest.mark.parametrize("script", [path.name for path in scripts()])
def test_script_main_stays_readable(script):
    tree = ast.parse((REPO / script).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "main":
            lines = node.end_lineno - node.lineno + 1
            assert lines <= MAIN_LINES, f"{script}: main() has {lines} lines (at most {MAIN_LINES})"


def documented_layout():
    """The files docs/DESIGN.md's layout tree names: "medicalgpt/<folder>/<module>.py" and the top-level scripts."""
    text = (REPO / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    tree = text.split("## Layout", 1)[1].split("```")[1]
    named, folder = set(), None
    for line in tree.splitlines():
        if line == "medicalgpt/":
            folder = "medicalgpt"
        elif folder and re.fullmatch(r"  (\w+)/", line):
            folder = "medicalgpt/" + line.strip().rstrip("/")
        elif folder and re.match(r"  \w+\.py", line):
            folder = "medicalgpt"
        if folder and re.match(r" +\w+\.py", line):
            named.add(f"{folder}/{line.split()[0]}")
        elif not folder:
            named.update(word for word in line.split() if word.endswith(".py"))
    return named


def test_design_doc_names_every_module_and_script():
    actual = {str(path.relative_to(REPO)) for path in package_modules().values() if path.name != "__init__.py"}
    actual |= {path.name for path in scripts()}
    actual |= {"medicalgpt/templates/__init__.py"}
    documented = documented_layout()
    missing, stale = sorted(actual - documented), sorted(documented - actual)
    assert not missing and not stale, f"docs/DESIGN.md layout: add {missing}, remove {stale}"


def test_tests_share_code_only_through_helpers():
    offenders = []
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        name = module_name(path)
        for imported in imported_names(path, name):
            parts = imported.split(".")
            test_module = [i for i, part in enumerate(parts) if part.startswith(("test_", "conftest"))]
            if parts[0] != "tests" or not test_module:
                continue
            imported = ".".join(parts[: test_module[0] + 1])
            if imported != name and TEST_IMPORTS_TO_MOVE.get(name) != imported:
                offenders.append(f"{name} imports {imported}")
    assert not offenders, "import shared test code from tests/helpers.py:\n" + "\n".join(sorted(set(offenders)))
