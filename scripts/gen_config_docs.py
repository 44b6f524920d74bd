"""Render README.md's configuration reference from ``dicom_node.config.Settings``.

    python scripts/gen_config_docs.py          # rewrite the table in README.md
    python scripts/gen_config_docs.py --check  # exit 1 when README.md is out of date

The table lies between ``<!-- config:begin -->`` and ``<!-- config:end -->``. Names and defaults
come from ``Settings.model_fields``; the meaning from a field's ``description`` when it has one,
otherwise from :data:`MEANINGS` below. A setting with neither stops the script, so a new setting
cannot land undocumented.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from pydantic_core import PydanticUndefined

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.config import Settings  # noqa: E402

README = REPO / "README.md"
BEGIN = "<!-- config:begin -->"
END = "<!-- config:end -->"

#: Meanings of the settings that carry no ``description`` in ``config.py``.
MEANINGS: dict[str, str] = {
    "data_dir": "spool (`DATA_DIR/spool`, shared with the workers unless `NODULEAI_SPOOL_URL`) and "
    "the SQLite database",
    "ae_title": "our AE title; associations calling another title are rejected",
    "dicom_host": "DICOM listener address",
    "dicom_port": "DICOM listener port",
    "http_host": "HTTP API and dashboard address",
    "http_port": "HTTP API and dashboard port",
    "db_url": "SQLAlchemy URL, e.g. `postgresql+psycopg://user:pw@host/db`; unset: SQLite file "
    "in `DATA_DIR`",
    "amqp_url": "RabbitMQ URL, e.g. `amqp://user:pw@host:5672/%2F`; unset: the embedded queue",
    "amqp_queue": "job queue name",
    "amqp_dead_letter_queue": "dead-letter queue name",
    "quiet_seconds": "a study is complete after this long without a new instance",
    "min_free_bytes": "below this free space on the spool, C-STORE answers 0xA700 before writing",
    "config": "YAML file with per-AE policies and result destinations",
    "max_associations": "concurrent associations; beyond, A-ASSOCIATE-RJ (transient)",
    "max_pdu_size": "largest PDU we receive",
    "acse_timeout": "association negotiation timeout (s)",
    "association_request_timeout": "seconds a new connection has to send its A-ASSOCIATE-RQ "
    "before it is closed (a few idle sockets cannot hold the association slots)",
    "max_pending_per_peer": "connections one peer address may hold that have not sent their "
    "A-ASSOCIATE-RQ yet; more are closed at once (logged)",
    "dimse_timeout": "DIMSE message timeout (s)",
    "network_timeout": "network idle timeout (s)",
    "tls_cert": "server certificate: DICOM over TLS (with `TLS_KEY`)",
    "tls_key": "server private key",
    "tls_client_ca": "require client certificates signed by this CA",
    "publish_retry_seconds": "publisher's retry interval while the broker is down",
    "log_level": "logging level",
    "backend": "inference backend: `tensorrt`, `onnx-tensorrt`, `onnx-cuda`, `onnx-cpu`, each "
    "falling back to those after it (the reason logged); `auto`: the first that loads",
    "fp16": "half precision on GPU backends",
    "models_dir": "folder of ONNX models and their manifests; unset: the shipped `models/weights`",
    "inference_threads": "CPU threads per inference session; unset: onnxruntime's choice",
    "operating_threshold": "detection probability threshold; unset: the model manifest's",
    "review_band": (
        "findings in this lowest fraction of the range from the operating threshold to 1 are "
        "reported as needing review (0.5 with a threshold of 0.95: below 0.975)"
    ),
    "heatmap": "also send stage 1's screening heatmap as a Parametric Map over the CT (OHIF "
    "draws it; about 4 bytes per CT pixel, so off by default)",
    "min_slices": "series with fewer slices are not eligible",
    "max_attempts": "attempts per job before it fails and is dead-lettered",
    "retry_backoff_seconds": "first retry delay of a job (doubles per attempt)",
    "job_timeout_seconds": "longest a job may hold its lease (embedded queue); also how long "
    "stopping waits for a running job",
    "workers": "inference workers that `serve` starts in its own process",
    "delivery_max_attempts": "attempts per result delivery before it fails",
    "delivery_backoff_seconds": "first retry delay of a delivery (doubles per attempt, at most "
    "300 s)",
    "spool_url": "workers on other hosts: the node's HTTP address (`http://node:8080`); the worker "
    "fetches each job's instances from it (size and SHA-256 checked) and sends its results there, "
    "so nothing is mounted in common; unset: the spool folder is shared",
    "spool_token": "bearer token of the node's `/spool` routes, the same on the node and its "
    "workers; unset on the node: no `/spool` routes",
    "dashboard_token": "bearer token for dashboard actions; unset (and no users): generated into "
    "`DATA_DIR/dashboard-token`",
    "dashboard_users": "basic-auth users for dashboard actions (operators), `alice:pw,bob:pw`",
    "dashboard_readers": "read-only users, `carol:pw`: they sign in and read, every action is "
    "refused (403, audited)",
    "dashboard_public_read": "dashboard pages, their JSON API and `/metrics` readable without "
    "credentials",
    "show_patient_data": "the study page shows patient name, ID and birth date (read from the "
    "spool)",
}


def _is_secret(annotation: Any) -> bool:
    return SecretStr in getattr(annotation, "__args__", ()) or annotation is SecretStr


def _default(value: Any) -> str:
    if value is PydanticUndefined or value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int) and value >= 1 << 20 and value % (1 << 20) == 0:
        return f"`{value}` ({value >> 30} GiB)" if value % (1 << 30) == 0 else f"`{value}`"
    if isinstance(value, Path):
        return f"`{value.as_posix() if value.is_absolute() else './' + value.as_posix()}`"
    return f"`{value}`"


def render() -> str:
    """The Markdown table, one row per setting, in the order ``Settings`` declares them."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    missing = []
    for name, field in Settings.model_fields.items():
        meaning = field.description or MEANINGS.get(name)
        if not meaning:
            missing.append(name)
            continue
        if _is_secret(field.annotation):
            meaning += " (secret: masked in logs and on the dashboard)"
        rows.append(f"| `NODULEAI_{name.upper()}` | {_default(field.default)} | {meaning} |")
    if missing:
        raise SystemExit(f"settings without a description: {', '.join(missing)} (add to MEANINGS)")
    return "\n".join(rows)


def updated(readme: str) -> str:
    """``readme`` with the text between the markers replaced by :func:`render`."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"README.md lacks the markers {BEGIN} ... {END}")
    return readme[: start + len(BEGIN)] + "\n" + render() + "\n" + readme[end:]


def main(argv: list[str] | None = None) -> int:
    """Rewrite README.md, or with ``--check`` report whether it is current."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when out of date")
    args = parser.parse_args(argv)
    current = README.read_text(encoding="utf-8")
    new = updated(current)
    if args.check:
        if new != current:
            print("README.md configuration table is out of date: run scripts/gen_config_docs.py")
            return 1
        return 0
    if new != current:
        README.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
