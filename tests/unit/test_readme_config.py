"""README.md's configuration reference is the one generated from the settings object."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from dicom_node.config import Settings

REPO = Path(__file__).resolve().parents[2]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_config_docs", REPO / "scripts" / "gen_config_docs.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_configuration_table_is_up_to_date() -> None:
    gen = _generator()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert gen.updated(readme) == readme, "run: python scripts/gen_config_docs.py"


def test_every_setting_is_documented_once() -> None:
    table = _generator().render()
    for name in Settings.model_fields:
        assert table.count(f"| `NODULEAI_{name.upper()}` |") == 1, name


def test_readme_keeps_its_two_set_up_commands() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "```sh\nmake serve\n```" in readme
    assert "```sh\nmake test\n```" in readme
