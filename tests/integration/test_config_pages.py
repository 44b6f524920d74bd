"""The configuration pages render every node configuration the README documents, secrets masked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from dicom_node.api import create_app
from dicom_node.config import NodeConfig, Settings
from dicom_node.db import Database
from dicom_node.migrate import upgrade

REPO = Path(__file__).resolve().parents[2]
SECRETS = ("change-me",)


def _readme_configs() -> list[str]:
    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    configs = [b for b in blocks if "ae_policies" in b or "destinations" in b]
    assert len(configs) >= 2, "the README documents at least two node configurations"
    return configs


@pytest.mark.parametrize("text", _readme_configs(), ids=lambda t: t.split("\n")[1].strip()[:30])
def test_every_readme_configuration_renders_on_the_api_and_the_page(
    text: str, tmp_path: Path
) -> None:
    config = NodeConfig.model_validate(yaml.safe_load(text))
    settings = Settings(data_dir=tmp_path, dashboard_token="t0ken-t0ken-t0ken")
    db = Database(settings.database_url)
    upgrade(db)
    try:
        with TestClient(create_app(db, settings, config)) as http:
            api = http.get("/api/config")
            page = http.get("/dashboard/config")
    finally:
        db.dispose()
    assert api.status_code == 200 and page.status_code == 200
    body = api.json()
    assert [d["name"] for d in body["destinations"]] == [d.name for d in config.destinations]
    assert [p["ae_title"] for p in body["ae_policies"]] == [p.ae_title for p in config.ae_policies]
    for secret in (*SECRETS, "t0ken-t0ken-t0ken"):
        assert secret not in api.text and secret not in page.text
    for destination in config.destinations:
        assert destination.name in page.text
    # settings as the environment writes them, not as Python prints them
    assert 'data-setting="heatmap">false<' in page.text
    assert 'data-setting="fp16">false<' in page.text
    assert ">True<" not in page.text and ">False<" not in page.text and ">[]<" not in page.text


def test_every_answer_carries_the_security_headers_and_the_pages_a_strict_csp(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path, dashboard_token="t0ken-t0ken-t0ken")
    db = Database(settings.database_url)
    upgrade(db)
    try:
        with TestClient(create_app(db, settings, NodeConfig())) as http:
            page, api, health = (
                http.get("/dashboard"),
                http.get("/api/studies"),
                http.get("/healthz"),
            )
    finally:
        db.dispose()
    for response in (page, api, health):
        assert response.status_code == 200
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
