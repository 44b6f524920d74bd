"""The ``noduleai`` command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from dicom_node.config import Settings, load_settings
from dicom_node.db import Database
from dicom_node.errors import ConfigError
from dicom_node.migrate import upgrade

LOGGER = logging.getLogger("noduleai")


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("pika").setLevel(logging.WARNING)


def _run_node(settings: Settings) -> int:
    from dicom_node.service import Node

    node = Node(settings)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node.start()
    LOGGER.info("ready")
    stop.wait()
    LOGGER.info("stopping")
    node.stop()
    return 0


def _db_upgrade(settings: Settings) -> int:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.database_url)
    upgrade(db)
    db.dispose()
    LOGGER.info("database schema is current")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``noduleai`` console script."""
    parser = argparse.ArgumentParser(prog="noduleai", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run everything in one process: SCP, jobs, workers, HTTP")
    commands.add_parser("node", help="run the DICOM node (SCP, completeness, jobs, HTTP)")
    db = commands.add_parser("db", help="database administration")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="create or migrate the schema to the newest revision")
    args = parser.parse_args(argv)

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"noduleai: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_level)
    LOGGER.info("effective configuration: %s", settings.effective())
    try:
        if args.command in ("serve", "node"):
            return _run_node(settings)
        return _db_upgrade(settings)
    except ConfigError as exc:
        LOGGER.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
