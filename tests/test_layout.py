"""The house rules of docs/DESIGN.md, read from the source with `ast` (nothing of the project is imported or run):

- the package stands on floors (FLOORS): a module imports only its own folder and the floors below, never a floor
  above nor a neighbour on its own floor, and the import graph has no cycle;
- serve/ and eval/ never import train/, directly or through other package modules;
- the package never imports a top-level script (template.py, supervised_finetuning.py, ...);
- package modules stay within 350 lines, scripts within 200 and their main() within 80;
- `# fmt: skip` only where a table needs it: the count is docs/DESIGN.md's;
- only the modules named in CONFIG_WRITERS change a trainer's config after the parser settled it;
- every training script ends the same way: train, save, evaluate, end_training;
- every `.map` of the package names its progress bar (`desc=`, or `**map_options(...)`, which gives one);
- docs/DESIGN.md's layout names every package module and every script, each in its folder;
- a test module imports shared test code only from tests/helpers.py (fixtures come from tests/conftest.py).
"""

import ast
import importlib.util
import re
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "medicalgpt"
MODULE_LINES = 350
SCRIPT_LINES = 200
MAIN_LINES = 80
# Modules allowed over the limit: {name: (lines, why)}. Keep it empty: split a module rather than list it.
LARGE_MODULES = {}
# The floors of the package, lowest first: {floor: its folders and root modules}. A module may import its own folder
# (or, for a root module, itself) and anything on a lower floor; nothing above, nor a neighbour on its own floor.
# answers, precision, sharding and loss_types are root modules other branches add (issues 25, 26, 29).
FLOORS = {
    1: ("errors", "constants", "console"),
    2: ("cli", "args", "device", "templates", "data", "answers", "precision", "sharding", "loss_types"),
    3: ("parser", "model", "processors"),
    4: ("serve",),
    5: ("eval", "train"),
    6: ("rl", "export", "quickstart"),
}
# Where a trainer's config (training_args, config) is changed after the parser settled it: {file: why}.
CONFIG_WRITERS = {
    "medicalgpt/train/packing.py": "SFT batches built by the loaded model's attention kernel (packing, padding_free)",
    "supervised_finetuning.py": "trl's own dataset preparation skipped for rows we truncated and packed",
    "reward_modeling.py": "max_length grown by the template's closing suffix appended to every pair",
    "medicalgpt/train/distill.py": "upstream's --opd_lambda / --opd_beta as trl GKD's lmbda / beta",
    "medicalgpt/rl/build.py": "trl's RLOO / GRPO lengths and steps from --response_length / --total_episodes",
}
CONFIG_NAMES = ("training_args", "config")  # what the scripts and the package call a trainer's config
# The end of every training script's main(), medicalgpt.train.run.train_and_evaluate, as the trainer methods it
# calls, in order (then end_training).
TRAINING_ENDING = ("train", "save_model", "log_metrics", "save_metrics", "save_state")
TRAINING_ENDING += ("evaluate", "log_metrics", "save_metrics")
TRAINING_SCRIPTS = ("pretraining.py", "supervised_finetuning.py", "reward_modeling.py", "dpo_training.py")
TRAINING_SCRIPTS += ("orpo_training.py", "distill_training.py", "ppo_training.py", "kto_training.py")
TRAINING_SCRIPTS += ("cpo_training.py",)
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


def group_of(name):
    """The folder (or root module) of a package module: medicalgpt.train.records -> train, medicalgpt.cli -> cli."""
    return name.split(".")[1] if "." in name else None


def floor_of(group):
    floors = [floor for floor, groups in FLOORS.items() if group in groups]
    return floors[0] if floors else None


def floor_violations(graph):
    """'a -> b' for each import that goes up the floors or sideways to a neighbour on the same floor."""
    found = []
    for name, imported in graph.items():
        group = group_of(name)
        for target in imported:
            other = group_of(target)
            if group is None or other is None or other == group:
                continue
            if floor_of(other) >= floor_of(group):
                found.append(f"{name} (floor {floor_of(group)}) -> {target} (floor {floor_of(other)})")
    return sorted(found)


def direct_imports(modules):
    """module -> the package modules its import statements name (not the packages importing them runs first)."""
    graph = {}
    for name, path in modules.items():
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")))}
        graph[name] = {imported for imported in imported_names(path, name) if imported in modules} - ancestors - {name}
    return graph


def find_cycle(graph):
    """One import cycle as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_every_package_module_stands_on_a_floor():
    unplaced = sorted({group_of(name) for name in package_modules() if group_of(name)} - set().union(*FLOORS.values()))
    assert not unplaced, f"give these a floor in FLOORS (and docs/DESIGN.md): {unplaced}"


def test_imports_only_go_down_the_floors():
    violations = floor_violations(package_imports(package_modules()))
    assert not violations, "imports up or sideways (docs/DESIGN.md, Import rules):\n" + "\n".join(violations)


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(direct_imports(package_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_floor_and_cycle_checkers_see_what_they_must():
    """The checkers themselves: data/ importing train/ goes up, eval/ importing train/ goes sideways, templates/
    importing errors goes down; a -> b -> a is a cycle."""
    graph = {
        "medicalgpt.data.x": {"medicalgpt.train.y", "medicalgpt.errors"},
        "medicalgpt.eval.z": {"medicalgpt.train.y", "medicalgpt.eval.w"},
        "medicalgpt.templates.t": {"medicalgpt.errors"},
    }
    assert floor_violations(graph) == [
        "medicalgpt.data.x (floor 2) -> medicalgpt.train.y (floor 5)",
        "medicalgpt.eval.z (floor 5) -> medicalgpt.train.y (floor 5)",
    ]
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("script", [path.name for path in scripts()])
def test_scripts_stay_short(script):
    lines = len((REPO / script).read_text(encoding="utf-8").splitlines())
    assert lines <= SCRIPT_LINES, f"{script} has {lines} lines (at most {SCRIPT_LINES}): move helpers into the package"


def fmt_skips():
    """`# fmt: skip` comments in the package and the scripts: {file: count}."""
    files = [*sorted(PACKAGE.rglob("*.py")), *scripts()]
    counts = {str(path.relative_to(REPO)): path.read_text(encoding="utf-8").count("# fmt: skip") for path in files}
    return {path: count for path, count in counts.items() if count}


def test_fmt_skip_count_is_the_one_docs_design_states():
    stated = re.search(r"(\d+) `# fmt: skip`", (REPO / "docs" / "DESIGN.md").read_text(encoding="utf-8"))
    found = fmt_skips()
    count = sum(found.values())
    assert stated and int(stated.group(1)) == count, f"docs/DESIGN.md: `# fmt: skip` in the code: {count}, {found}"


def config_fields():
    """The field names of transformers' and trl's trainer configs and of PPOConfig, read from their source."""
    roots = [Path(importlib.util.find_spec(name).origin).parent for name in ("transformers", "trl")]
    files = [roots[0] / "training_args.py", *roots[1].rglob("*config*.py"), PACKAGE / "rl" / "config.py"]
    names = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Arguments", "Config")):
                names.update(
                    item.target.id
                    for item in node.body
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                )
    return names


def config_writes(path, fields):
    """`training_args.X = ...` / `config.X = ...` statements of `path` that set a trainer config field X."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if not isinstance(node, (ast.Assign, ast.AugAssign)):
            continue
        for target in targets:
            for item in target.elts if isinstance(target, ast.Tuple) else [target]:
                if isinstance(item, ast.Attribute) and isinstance(item.value, ast.Name) and item.attr in fields:
                    if item.value.id in CONFIG_NAMES:
                        found.add(f"{item.value.id}.{item.attr}")
    return found


def test_only_the_listed_modules_change_a_trainer_config():
    fields = config_fields()
    assert {"max_length", "packing", "max_steps", "lmbda"} <= fields  # the fields the listed modules set
    writers = {}
    for path in [*sorted(PACKAGE.rglob("*.py")), *scripts()]:
        writes = config_writes(path, fields)
        if writes:
            writers[str(path.relative_to(REPO))] = sorted(writes)
    assert set(writers) == set(CONFIG_WRITERS), f"trainer config changed in {writers}; list each in CONFIG_WRITERS"


def trainer_calls(function):
    """The `trainer.<method>(...)` calls in `function`, in source order."""
    calls = [
        node
        for node in ast.walk(function)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "trainer"
    ]
    return [call.func.attr for call in sorted(calls, key=lambda call: (call.lineno, call.col_offset))]


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_every_training_script_ends_the_same_way(script):
    tree = ast.parse((REPO / script).read_text(encoding="utf-8"))
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    last = main.body[-1]
    assert isinstance(last, ast.Expr) and getattr(last.value.func, "id", None) == "train_and_evaluate", script
    assert getattr(last.value.args[0], "id", None) == "trainer", script
    assert not set(trainer_calls(main)) & set(TRAINING_ENDING), f"{script} trains or evaluates by itself"


def test_the_shared_ending_trains_saves_evaluates_and_leaves_together():
    tree = ast.parse((PACKAGE / "train" / "run.py").read_text(encoding="utf-8"))
    ending = next(
        node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "train_and_evaluate"
    )
    assert tuple(trainer_calls(ending)) == TRAINING_ENDING
    last = ending.body[-2].value
    assert getattr(last.func, "id", None) == "end_training"


def test_every_map_names_its_progress_bar():
    unnamed = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "map":
                keywords = {keyword.arg for keyword in node.keywords}
                spread = [k.value for k in node.keywords if k.arg is None and isinstance(k.value, ast.Call)]
                if "desc" not in keywords and not any(getattr(c.func, "id", "") == "map_options" for c in spread):
                    unnamed.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not unnamed, f".map without desc=: {unnamed}"


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
