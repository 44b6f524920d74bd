"""The layers stay layers: ``models`` → ``pipelines`` → ``dicom_node``, never back."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _imported(module: str) -> set[str]:
    """The project's modules a fresh interpreter loads to import ``module``."""
    code = (
        f"import sys, {module}\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('dicom_node', 'pipelines', 'models'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "module", ["dicom_node.node", "dicom_node.api", "dicom_node.delivery", "dicom_node.lifecycle"]
)
def test_the_node_imports_neither_pipelines_nor_models(module: str) -> None:
    loaded = _imported(module)
    assert not {m for m in loaded if m.split(".")[0] in ("pipelines", "models")}


def test_the_worker_imports_no_delivery_code_and_no_models() -> None:
    loaded = _imported("pipelines.worker")
    assert "dicom_node.delivery" not in loaded and "dicom_node.fhir_client" not in loaded
    assert not {m for m in loaded if m.split(".")[0] == "models"}
