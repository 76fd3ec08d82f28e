"""Every command in README.md, README_zh.md and docs/ runs as written: the scripts, modules, recipes and config files
it names exist, and every --flag it gives a script is one that script's parser accepts."""

import contextlib
import importlib
import io
import re
import shlex

import pytest

from tests.helpers import REPO

DOCS = [
    REPO / "README.md",
    REPO / "README_zh.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted((REPO / "docs" / "zh").glob("*.md")),
]
FENCE = re.compile(r"^```(bash|sh|shell|console)\n(.*?)^```", re.M | re.S)
SEPARATORS = {"&&", "||", ";", "|", "&"}
REPO_FOLDERS = ("examples/", "configs/", "data/", "scripts/", "docs/", "tests/", "bench/")
FLAG = re.compile(r"--[A-Za-z][\w-]*")


def shell_commands(path):
    """(line, [tokens]) for each command of the file's shell blocks: continuations joined, comments dropped, split
    at && ; | (the tokens of `a && b` are two commands)."""
    text = path.read_text(encoding="utf-8")
    for block in FENCE.finditer(text):
        start = text.count("\n", 0, block.start(2)) + 1
        joined = block.group(2).replace("\\\n", " ")
        for offset, line in enumerate(joined.splitlines()):
            line = line.removeprefix("$ ")
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:  # a line of a heredoc or a JSON body
                continue
            command = []
            for token in [*tokens, ";"]:
                if token in SEPARATORS:
                    if command:
                        yield start + offset, command
                    command = []
                else:
                    command.append(token)


def all_commands():
    return [(path, line, tokens) for path in DOCS if path.exists() for line, tokens in shell_commands(path)]


def script_of(tokens):
    """(script, its flags) of a command that runs one of the project's scripts, else (None, [])."""
    for index, token in enumerate(tokens):
        if re.fullmatch(r"[\w./-]+\.py", token) and "/" not in token.removeprefix("./"):
            flags = [FLAG.match(t).group(0) for t in tokens[index + 1 :] if FLAG.match(t)]
            return token.removeprefix("./"), flags
    return None, []


_accepted = {}


def accepted_flags(script, capsys):
    """The options `script --help` lists (every spelling), read once per script."""
    if script not in _accepted:
        module = importlib.import_module(script.removesuffix(".py"))
        capsys.readouterr()
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            module.main(["--help"])
        text = capsys.readouterr().out
        _accepted[script] = set(FLAG.findall(text)) | {"--help"}
    return _accepted[script]


def test_the_docs_have_commands():
    assert len(all_commands()) > 50


def test_every_named_script_recipe_and_config_exists():
    missing = []
    for path, line, tokens in all_commands():
        for token in tokens:
            token = token.split("=", 1)[-1] if token.startswith("--") else token
            named = token.removeprefix("./")
            in_repo = named.startswith(REPO_FOLDERS) or re.fullmatch(r"\w+\.(py|sh)", named)
            if in_repo and not any(c in named for c in "*<>$") and not (REPO / named).exists():
                missing.append(f"{path.name}:{line}: {token}")
        if tokens[:2] == ["python", "-m"] and tokens[2].startswith("medicalgpt."):
            module = REPO / (tokens[2].replace(".", "/") + ".py")
            if not module.exists():
                missing.append(f"{path.name}:{line}: {tokens[2]}")
    assert not missing, "\n".join(missing)


def test_every_flag_given_to_a_script_is_one_it_accepts(capsys):
    unknown = []
    for path, line, tokens in all_commands():
        script, flags = script_of(tokens)
        if script is None or not (REPO / script).exists():
            continue
        accepted = accepted_flags(script, capsys)
        unknown += [f"{path.name}:{line}: {script} {flag}" for flag in flags if flag not in accepted]
    assert not unknown, "\n".join(unknown)


def anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(text):
    fenced, found = False, []
    for line in text.splitlines():
        fenced = fenced != line.startswith("```")
        if not fenced and re.match(r"#{1,6} ", line):
            found.append(anchor(line.lstrip("#")))
    return found


@pytest.mark.parametrize("name", ["README.md", "README_zh.md"])
def test_each_readme_opens_with_a_table_of_contents_whose_links_resolve(name):
    text = (REPO / name).read_text(encoding="utf-8")
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert len(links) >= 8 and set(links) <= set(headings(text)), set(links) - set(headings(text))
    assert text.index("make quickstart") < text.index("make test") < 2500  # the two commands on the first screen


def test_the_readme_is_short_and_links_every_topic():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 400
    topics = sorted(path.name for path in (REPO / "docs").glob("*.md"))
    assert all(f"](docs/{topic})" in readme for topic in topics), topics
    zh = (REPO / "README_zh.md").read_text(encoding="utf-8")
    assert all(f"](docs/{topic})" in zh for topic in topics) and "](README.md)" in zh and "](README_zh.md)" in readme
    for topic in topics:  # each topic links back
        assert "](../README.md" in (REPO / "docs" / topic).read_text(encoding="utf-8") or topic == "DESIGN.md"


def test_the_chinese_topic_pages_translate_every_english_one_and_their_links_resolve():
    english = sorted(path.name for path in (REPO / "docs").glob("*.md") if path.name != "DESIGN.md")
    chinese = sorted(path.name for path in (REPO / "docs" / "zh").glob("*.md"))
    assert chinese == english
    zh = (REPO / "README_zh.md").read_text(encoding="utf-8")
    assert all(f"](docs/zh/{topic})" in zh for topic in chinese)
    broken = []
    for page in (REPO / "docs" / "zh").glob("*.md"):
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#:]+\.md)(#[^)]*)?\)", text):
            path, fragment = target
            resolved = (page.parent / path).resolve()
            if not resolved.exists():
                broken.append(f"{page.name}: {path}")
            elif fragment and fragment[1:] not in headings(resolved.read_text(encoding="utf-8")):
                broken.append(f"{page.name}: {path}{fragment}")
    assert not broken, broken
