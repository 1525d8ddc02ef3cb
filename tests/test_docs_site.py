"""The README and the documentation pages: short, free of dated notebook material, no broken
relative link, every `equiseg ...` command line of the README and the guide one that the CLI
accepts in its current vocabulary, and every `equiseg.x.y` they name one that exists.

Fast: reads files and the Typer app; the site itself is built by `make docs` (in CI), not here.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import click
import pytest
import typer.main

from equiseg.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
COMMIT_HASH = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# Typer >= 0.20 vendors its own click, whose errors derive from TyperException; older Typer uses click's
USAGE_ERRORS = tuple(e for e in (getattr(typer, "TyperException", None), click.ClickException) if e is not None)
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def relative_links(path: Path) -> list[str]:
    """The relative link targets of a Markdown file, outside code blocks and code spans."""
    text = FENCE.sub("", path.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"[a-z]+:|#|/", t)]


def broken_links(path: Path) -> list[str]:
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    return [f"{name}: {target}" for target in relative_links(path)
            if not (path.parent / target.split("#")[0]).exists()]


def command_lines(text: str) -> list[list[str]]:
    """Every `equiseg ...` command in the code blocks of a Markdown text, as argument lists (comments cut)."""
    lines = []
    for block in FENCE.findall(text):
        for line in block.splitlines()[1:-1]:
            line = line.strip().removeprefix("$ ")
            if line.startswith("equiseg "):
                lines.append(shlex.split(line, comments=True)[1:])
    return lines


@functools.cache
def program():
    """The click group of the `equiseg` program and its root context."""
    group = typer.main.get_command(app)
    return group, group.context_class(group, info_name="equiseg")


def command_problems(args: list[str]) -> list[str]:
    """What the CLI would not accept in ``equiseg ARGS``, in the new vocabulary: an unknown command,
    an option the command does not have (or has only as a deprecated, hidden spelling), a value
    given to a deprecated hidden argument, or arguments that do not parse.
    """
    group, root = program()
    name, rest = args[0], args[1:]
    command = group.get_command(root, name)
    if command is None or command.hidden:
        return [f"equiseg {name}: no such command"]
    visible = [p for p in command.params if not p.hidden]
    names = {opt for p in visible for opt in [*p.opts, *getattr(p, "secondary_opts", [])] if opt.startswith("-")}
    problems = [f"equiseg {name}: no option {token}" for token in rest
                if token.startswith("-") and token.split("=")[0] not in names | {"--help"}]
    try:
        ctx = command.make_context(name, list(rest), parent=root)
    except USAGE_ERRORS as error:  # a missing value, an extra argument, ...
        return [*problems, f"equiseg {' '.join(args)}: {error}"]
    hidden_used = [p.name for p in command.params if p.hidden and ctx.params.get(p.name) not in (None, False, (), [])]
    return problems + [f"equiseg {' '.join(args)}: uses the deprecated spelling of {n}" for n in hidden_used]


DOTTED = re.compile(r"`(equiseg(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def resolves(dotted: str) -> bool:
    """Whether ``equiseg.a.b.C.d`` names something: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_python_names_in_the_guide_exist():
    """Every `equiseg.x.y` the README and the guide name is importable: the guide follows the code."""
    texts = [README, DOCS / "index.md", DOCS / "getting-started.md", *sorted((DOCS / "guide").glob("*.md"))]
    files = ("json", "yaml", "csv", "txt", "png", "md")  # `equiseg.json` is a file name
    names = {m.group(1) for path in texts for m in DOTTED.finditer(path.read_text())
             if m.group(1).rsplit(".", 1)[1] not in files}
    assert len(names) > 5
    missing = sorted(name for name in names if not resolves(name))
    assert not missing, missing


def test_the_name_check_sees_a_missing_name():
    assert resolves("equiseg.models.build_model") and resolves("equiseg.groups.D4")
    assert not resolves("equiseg.models.no_such_function") and not resolves("equiseg.no_such_module.f")


def test_readme_is_short_and_has_no_notebook_material():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    assert not COMMIT_HASH.findall(text), COMMIT_HASH.findall(text)
    assert "the seed" not in text.lower()
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "a dated measurement belongs in docs/changelog.md"


@pytest.mark.parametrize("folder", ["guide", "reference"])
def test_guide_and_reference_pages_have_no_commit_hashes(folder):
    found = {p.name: COMMIT_HASH.findall(p.read_text()) for p in (DOCS / folder).glob("*.md")}
    assert not {k: v for k, v in found.items() if v}, found


def test_every_relative_link_points_at_a_file():
    broken = [problem for path in pages() for problem in broken_links(path)]
    assert not broken, "\n".join(broken)


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[ok](page.md) [gone](missing.md#x) `[code](not-a-link.md)`\n```\n[block](nor.md)\n```\n")
    assert [p.split(": ")[1] for p in broken_links(page)] == ["missing.md#x"]


def test_readme_commands_exist_with_their_options():
    lines = command_lines(README.read_text())
    assert len(lines) >= 10, "the quickstart lost its commands"
    problems = [problem for args in lines for problem in command_problems(args)]
    assert not problems, "\n".join(problems)


def test_guide_commands_exist_with_their_options():
    guide = [DOCS / "index.md", DOCS / "getting-started.md", *sorted((DOCS / "guide").glob("*.md"))]
    lines = [args for path in guide for args in command_lines(path.read_text())]
    assert len(lines) >= 30
    problems = [problem for args in lines for problem in command_problems(args)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("line", [
    "equiseg evaluate --model runs/iso --no-such-option 3",   # an option the command lacks
    "equiseg evalute --model runs/iso",                       # a command that does not exist
    "equiseg evaluate runs/iso",                              # the deprecated positional run
    "equiseg slide slide.tif --cell-model runs/iso",          # a deprecated (hidden) option
    "equiseg score only-one.json",                            # a missing argument
])
def test_the_command_check_sees_a_bad_line(line):
    (args,) = command_lines(f"```bash\n{line}\n```\n")
    assert command_problems(args)


@functools.cache
def reference_hook():
    """docs/hooks/reference.py, the MkDocs hook that generates the reference pages."""
    spec = importlib.util.spec_from_file_location("reference_hook", DOCS / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_reference_lists_every_command_in_one_vocabulary():
    text = reference_hook().cli_markdown()
    group, root = program()
    for name in group.list_commands(root):
        assert (f"## `equiseg {name}`" in text) != group.get_command(root, name).hidden
    for old in ("--cell-model", "--devices", "--runs", "old_"):
        assert old not in text, f"the reference shows the deprecated spelling {old}"


def test_every_config_key_has_a_meaning_in_the_reference():
    """The hook refuses a key without an Attributes: entry; each key is one row."""
    from equiseg.config import Config

    def keys(cls, prefix=""):
        import dataclasses

        from equiseg.data.augment import AugmentConfig

        for f in dataclasses.fields(cls):
            default = getattr(cls(), f.name)
            if dataclasses.is_dataclass(default) and not isinstance(default, AugmentConfig):
                yield from keys(type(default), f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    text = reference_hook().config_markdown()
    missing = [key for key in keys(Config) if f"| `{key}` |" not in text]
    assert not missing, missing
