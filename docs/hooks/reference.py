"""MkDocs hook: the reference pages, generated from the code each time the site is built.

A page holds a marker comment where its generated part goes:

- ``<!-- equiseg:cli -->``: every command of the ``equiseg`` program and each of its options and
  arguments, walked from the Typer app (``typer.main.get_command(equiseg.cli.app)``): name, usage,
  help, and per parameter its type, default and help. Hidden parameters (the deprecated spellings)
  and hidden commands are left out.
- ``<!-- equiseg:config -->``: every key of a run config (``equiseg.config.Config`` and its
  sections) as ``section.key`` with its type, default and meaning; the meaning is the
  ``Attributes:`` entry of the section's docstring (Google style).
- ``<!-- equiseg:api -->``: one mkdocstrings block (``::: path``) per name in ``equiseg.__all__``,
  grouped by the module that defines it; mkdocstrings renders them after this hook has run.

Also puts every page of docs/benchmarks/ into the Benchmarks section of the navigation, so that
a new benchmark page needs no edit of mkdocs.yml.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import re
import typing
from pathlib import Path
from typing import Any

CLI_MARKER = "<!-- equiseg:cli -->"
CONFIG_MARKER = "<!-- equiseg:config -->"
API_MARKER = "<!-- equiseg:api -->"


# --- the CLI ----------------------------------------------------------------------------------


def _plain_brackets(text: str) -> str:
    """Square brackets outside code spans escaped, so that ``high[, log]`` is not read as a link."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(part if part.startswith("`") else part.replace("[", "\\[").replace("]", "\\]")
                   for part in parts)


def _cell(text: Any) -> str:
    """``text`` fit for one cell of a Markdown table: one line, pipes escaped."""
    return _plain_brackets(" ".join(str(text).split())).replace("|", "\\|")


def _context(command: Any, name: str, parent: Any = None) -> Any:
    """A (parse-free) context for ``command``: Typer vendors its own click, so take its class."""
    return command.context_class(command, info_name=name, parent=parent)


def _type_name(param: Any, ctx: Any) -> str:
    """The parameter's type as a reader wants it: ``int``, ``float``, ``path``, ``flag``, ``int ≥ 1``."""
    if getattr(param, "is_flag", False):
        return "flag"
    if hasattr(param, "bare_type"):  # Typer >= 0.20 (its own click): the annotation's name
        name = param.bare_type()
        name = name.replace("list[", "").replace("]", "") if name.startswith("list[") else name
    else:
        kind = param.type
        name = "|".join(kind.choices) if hasattr(kind, "choices") else kind.name
    name = {"Path": "path", "str": "text"}.get(name, name)
    low, high = getattr(param, "min", None), getattr(param, "max", None)
    if low is not None and high is not None:
        return f"{name} in [{low}, {high}]"
    if low is not None:
        return f"{name} ≥ {low}"
    if high is not None:
        return f"{name} ≤ {high}"
    return name


def _default(param: Any, ctx: Any) -> str:
    if param.required:
        return "required"
    value = param.get_default(ctx)
    if getattr(param, "secondary_opts", None):  # --optimize/--no-optimize: the spelling that is on
        return f"`{param.opts[0] if value else param.secondary_opts[0]}`"
    if value is None or value is False or value == () or value == []:
        return ""
    if isinstance(value, enum.Enum):
        value = value.value
    return f"`{value}`"


def _names(param: Any) -> str:
    if param.param_type_name == "argument":
        suffix = " ..." if param.nargs == -1 else ""
        return f"`{param.name.upper()}{suffix}`"
    names = [*param.opts, *getattr(param, "secondary_opts", [])]
    return ", ".join(f"`{name}`" for name in sorted(names, key=lambda n: (n.startswith("--no-"), len(n))))


def _help_text(text: str | None) -> str:
    """A command's docstring as Markdown (the app renders help as Markdown too)."""
    return _plain_brackets(inspect.cleandoc(text or "").replace("\b\n", ""))


def _usage(command: Any, name: str, params: list) -> str:
    """``equiseg NAME [OPTIONS] IMAGES...``: the visible arguments only (not the deprecated ones)."""
    pieces = [f"equiseg {name}"]
    if any(p.param_type_name == "option" for p in params):
        pieces.append("[OPTIONS]")
    for param in params:
        if param.param_type_name == "argument":
            word = param.name.upper() + ("..." if param.nargs == -1 else "")
            pieces.append(word if param.required else f"[{word}]")
    if command.context_settings.get("allow_extra_args"):
        pieces.append("[KEY=VALUE ...]")
    return " ".join(pieces)


def _command_section(command: Any, name: str, parent_ctx: Any) -> list[str]:
    ctx = _context(command, name, parent_ctx)
    params = [p for p in command.params if not getattr(p, "hidden", False)]
    lines = [f"## `equiseg {name}`", "", _help_text(command.help), "", "```text", _usage(command, name, params),
             "```", ""]
    if params:
        lines += ["| argument / option | type | default | meaning |", "| --- | --- | --- | --- |"]
        for param in params:
            help_text = getattr(param, "help", None) or ""
            if getattr(param, "envvar", None):
                help_text += f" (environment: `{param.envvar}`)"
            lines.append(f"| {_names(param)} | {_cell(_type_name(param, ctx))} | {_cell(_default(param, ctx))} | "
                         f"{_cell(help_text)} |")
        lines.append("")
    return lines


def cli_markdown() -> str:
    """Every visible command of the ``equiseg`` program, in the order of ``equiseg --help``."""
    import typer.main

    from equiseg.cli import app

    group = typer.main.get_command(app)
    root = _context(group, "equiseg")
    lines = ["## `equiseg`", "", _help_text(group.help), "", "```text", "equiseg [OPTIONS] COMMAND [ARGS]...",
             "```", "", "| option | type | default | meaning |", "| --- | --- | --- | --- |"]
    for param in group.params:
        if not getattr(param, "hidden", False):
            help_text = (getattr(param, "help", None) or "") + (f" (environment: `{param.envvar}`)"
                                                                 if getattr(param, "envvar", None) else "")
            lines.append(f"| {_names(param)} | {_cell(_type_name(param, root))} | {_cell(_default(param, root))} "
                         f"| {_cell(help_text)} |")
    lines += ["", "| command | what it does |", "| --- | --- |"]
    names = [n for n in group.list_commands(root) if not group.get_command(root, n).hidden]
    for name in names:
        command = group.get_command(root, name)
        summary = command.get_short_help_str(limit=200)
        lines.append(f"| [`{name}`](#equiseg-{name}) | {_cell(summary)} |")
    lines.append("")
    for name in names:
        lines += _command_section(group.get_command(root, name), name, root)
    return "\n".join(lines)


# --- the config keys --------------------------------------------------------------------------


def _attributes(cls: type) -> dict[str, str]:
    """The ``Attributes:`` section of ``cls``'s docstring (Google style): field name -> meaning."""
    import griffe

    docstring = griffe.Docstring(inspect.getdoc(cls) or "")
    meanings: dict[str, str] = {}
    for section in docstring.parse("google"):
        if section.kind.value == "attributes":
            meanings.update({item.name: " ".join(item.description.split()) for item in section.value})
    return meanings


def _first_paragraph(cls: type) -> str:
    return " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())


def _type_text(hint: Any) -> str:
    """A field's annotation for readers: ``int``, ``float or empty``, ``list of text``, ``one of a, b``."""
    args = typing.get_args(hint)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return " or ".join(_type_text(a) for a in rest) + " or empty"
    if typing.get_origin(hint) is tuple:
        return f"list of {_type_text(args[0])}"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(f"`{member.value}`" for member in hint)
    return {str: "text", bool: "true/false"}.get(hint, getattr(hint, "__name__", str(hint)))


def _yaml_value(value: Any) -> str:
    import yaml

    from equiseg.config import plain

    value = plain(value)
    if value is None:
        return "empty"
    return f"`{yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix('...').strip()}`"


def _config_rows(cls: type, prefix: str) -> list[str]:
    """One table row per key of the config dataclass ``cls``; nested sections get their own table."""
    from equiseg.data.augment import AugmentConfig

    hints = typing.get_type_hints(cls)
    meanings = _attributes(cls)
    defaults = cls()
    rows, sections = [], []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = getattr(defaults, f.name)
        meaning = meanings.get(f.name, "")
        if not meaning:
            raise ValueError(f"config key {key} has no meaning: add it to the Attributes: of {cls.__name__}'s "
                             "docstring (docs/hooks/reference.py)")
        if dataclasses.is_dataclass(default) and not isinstance(default, AugmentConfig):
            sections.append((type(default), f"{key}."))
            continue
        if isinstance(default, AugmentConfig):
            rows.append(f"| `{key}` | a preset (`none`, `heavy`, `non_symmetry`) or a mapping, below | `none` | "
                        f"{_cell(meaning)} |")
            for transform in dataclasses.fields(AugmentConfig):
                kind, settings = type(transform.default), transform.default
                values = ", ".join(f"{s.name}: {getattr(settings, s.name)}" for s in dataclasses.fields(kind))
                rows.append(f"| `{key}.{transform.name}` | mapping | `{{{values}}}` | "
                            f"{_cell(_first_paragraph(kind))} |")
            continue
        rows.append(f"| `{key}` | {_cell(_type_text(hints[f.name]))} | {_cell(_yaml_value(default))} | "
                    f"{_cell(meaning)} |")
    lines = []
    if rows:
        title = prefix.rstrip(".") or "top level"
        lines += [f"## `{title}`" if prefix else "## Top level", "", _first_paragraph(cls), "",
                  "| key | type | default | meaning |", "| --- | --- | --- | --- |", *rows, ""]
    for section, section_prefix in sections:
        lines += _config_rows(section, section_prefix)
    return lines


def config_markdown() -> str:
    from equiseg.config import Config

    return "\n".join(_config_rows(Config, ""))


# --- the Python API ---------------------------------------------------------------------------


def _defining_path(name: str, obj: Any) -> str:
    """Where ``equiseg.NAME`` is defined: ``equiseg.models.build.build_model`` (an instance such
    as ``C4`` has no module of its own, so mkdocstrings follows the import from equiseg).
    """
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if (inspect.isclass(obj) or inspect.isfunction(obj)) and module and qualname:
        return f"{module}.{qualname}"
    return f"equiseg.{name}"


# the packages of equiseg.__all__ from the bottom layer up (docs/architecture.md); others follow by name
API_ORDER = ["equiseg.groups", "equiseg.nn", "equiseg.models", "equiseg.config", "equiseg.presets", "equiseg.runs",
             "equiseg.training", "equiseg.evaluation", "equiseg.inference", "equiseg.export"]


def api_markdown() -> str:
    import equiseg

    groups: dict[str, list[str]] = {}
    for name in equiseg.__all__:
        path = _defining_path(name, getattr(equiseg, name))
        package = ".".join(path.split(".")[:2]) if path != f"equiseg.{name}" else "equiseg.groups"
        groups.setdefault(package, []).append(path)
    lines = []
    for module in sorted(groups, key=lambda m: (API_ORDER.index(m) if m in API_ORDER else len(API_ORDER), m)):
        lines += [f"## `{module}`", ""]
        for path in groups[module]:
            lines += [f"::: {path}", ""]
    return "\n".join(lines)


# --- the hooks --------------------------------------------------------------------------------

GENERATORS = {CLI_MARKER: cli_markdown, CONFIG_MARKER: config_markdown, API_MARKER: api_markdown}


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    for marker, generate in GENERATORS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, generate())
    return markdown


def on_config(config: Any) -> Any:
    """Every page under docs/benchmarks/ joins the Benchmarks section of the nav, after its index."""
    folder = Path(config["docs_dir"]) / "benchmarks"
    for item in config["nav"] or []:
        if isinstance(item, dict) and "Benchmarks" in item:
            section = item["Benchmarks"]
            section = section if isinstance(section, list) else [section]
            listed = {entry if isinstance(entry, str) else next(iter(entry.values())) for entry in section}
            section += [f"benchmarks/{page.name}" for page in sorted(folder.glob("*.md"))
                        if f"benchmarks/{page.name}" not in listed]
            item["Benchmarks"] = section
    return config


if __name__ == "__main__":  # print one generated part: python docs/hooks/reference.py cli|config|api
    import sys

    print({"cli": cli_markdown, "config": config_markdown, "api": api_markdown}[sys.argv[1]]())
