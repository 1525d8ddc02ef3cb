"""Named presets: the run and study configs shipped inside the package (``equiseg/configs/*.yaml``).

A preset is named by its file name without ``.yaml`` (``isotropic-small``); ``equiseg train -c``,
``equiseg study -c`` and a study's ``base:`` take a preset name or a path to a YAML file, so they
work from an installed wheel as well as from a source checkout. ``equiseg presets`` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from equiseg.config import Config, ConfigError, apply_overrides

SUFFIX = ".yaml"


@dataclass(frozen=True)
class Preset:
    """One packaged preset: its name, its file, and the first comment line of that file."""

    name: str
    path: Path
    description: str


def presets_dir() -> Path:
    """The folder of the packaged presets.

    ``importlib.resources`` finds it wherever the package is installed; a wheel installs as
    plain files, so the folder is a real directory (not a zip member).
    """
    return Path(str(resources.files("equiseg") / "configs"))


def preset_names() -> list[str]:
    """The names of the packaged presets, sorted."""
    return sorted(path.name.removesuffix(SUFFIX) for path in presets_dir().glob(f"*{SUFFIX}"))


def preset_path(name_or_path: str | Path) -> Path:
    """The YAML file a ``-c`` argument names: an existing file as given, else a packaged preset.

    Args:
        name_or_path: a path to a YAML file, or a preset name with or without ``.yaml``
            (``isotropic-small``, ``isotropic-small.yaml``).

    Raises:
        ConfigError: neither an existing file nor a packaged preset; the message lists the presets.
    """
    given = Path(name_or_path)
    if given.is_file():
        return given
    # only a bare name can be a preset: a path with folders that does not exist is a typo in a path
    if given.name == str(name_or_path):
        packaged = presets_dir() / (given.name.removesuffix(SUFFIX) + SUFFIX)
        if packaged.is_file():
            return packaged
    raise ConfigError(f"{name_or_path}: no such file and no such preset; presets: {', '.join(preset_names())}")


def list_presets() -> list[Preset]:
    """Every packaged preset with its one-line description (its first comment line, or "")."""
    result = []
    for name in preset_names():
        path = presets_dir() / (name + SUFFIX)
        first = next((line for line in path.read_text().splitlines() if line.strip()), "")
        description = first.lstrip("#").strip() if first.lstrip().startswith("#") else ""
        result.append(Preset(name, path, description))
    return result


def load_config(name_or_path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A run config by preset name or YAML path, with ``KEY=VALUE`` overrides applied.

    The one way every command and a Python user read a run config: ``load_config("isotropic-small",
    ["train.epochs=5"])``. Without a name the defaults of `equiseg.config.Config` are the base.

    Args:
        name_or_path: a preset name (`equiseg presets` lists them) or a YAML file; None: the defaults.
        overrides: ``KEY=VALUE`` strings (values read as YAML scalars), e.g. ``"data.augment=heavy"``.

    Raises:
        ConfigError: an unknown preset or file, a bad key or value.
    """
    if name_or_path is None:
        return Config.from_dict(apply_overrides({}, list(overrides)))
    return Config.from_yaml(preset_path(name_or_path), overrides)
