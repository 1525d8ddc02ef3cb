"""The packaged presets: found by name inside the installed package, listed, and all valid."""

from pathlib import Path

import pytest

import equiseg
from equiseg.config import Config, ConfigError
from equiseg.presets import list_presets, preset_names, preset_path
from equiseg.study import StudyConfig

PACKAGE = Path(equiseg.__file__).resolve().parent


def test_a_preset_name_resolves_to_the_file_inside_the_package():
    path = preset_path("isotropic-small")
    assert path.resolve() == PACKAGE / "configs" / "isotropic-small.yaml"
    assert preset_path("isotropic-small.yaml") == path
    assert Config.from_yaml(path).name == "isotropic-small"


def test_an_existing_file_is_used_as_given(tmp_path, monkeypatch):
    own = tmp_path / "isotropic-small.yaml"  # the same name as a preset: the file wins
    own.write_text("name: mine\n")
    assert preset_path(own) == own
    monkeypatch.chdir(tmp_path)
    assert Config.from_yaml(preset_path("isotropic-small.yaml")).name == "mine"


@pytest.mark.parametrize("name", ["no-such-preset", "configs/isotropic-small.yaml"])
def test_unknown_names_and_missing_paths_list_the_presets(name):
    with pytest.raises(ConfigError, match=r"no such file and no such preset; presets: .*isotropic-small"):
        preset_path(name)


def test_every_preset_is_valid_and_described():
    presets = list_presets()
    assert [p.name for p in presets] == preset_names()
    assert {"isotropic-small", "plain-small", "isotropic-paper", "plain-paper", "study-small"} <= set(preset_names())
    for preset in presets:
        assert preset.description and not preset.description.startswith("#"), preset.name
        if preset.name.startswith("study-"):
            StudyConfig.from_yaml(preset.name)  # its base: is a preset name too
        else:
            Config.from_yaml(preset.path)


def test_only_the_paper_presets_require_real_data():
    for name in preset_names():
        if not name.startswith("study-"):
            assert Config.from_yaml(preset_path(name)).data.require_real == name.endswith("-paper"), name
