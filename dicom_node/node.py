"""The service: the parts of the node wired together, started and stopped in order."""

from __future__ import annotations

import logging
import threading

import uvicorn

from dicom_node.api import create_app
from dicom_node.completeness import CompletenessLoop, CompletenessTracker
from dicom_node.config import NodeConfig, Settings
from dicom_node.db import Database
from dicom_node.delivery import DeliveryLoop
from dicom_node.ingest import Ingest
from dicom_node.migrate import upgrade
from dicom_node.policy import AssociationPolicy
from dicom_node.publisher import Publisher
from dicom_node.queues import make_job_queue
from dicom_node.scp import StorageSCP
from dicom_node.spool import LocalSpool

LOGGER = logging.getLogger(__name__)


class Node:
    """SCP, completeness, job publisher and HTTP API in one process.

    Parameters
    ----------
    settings : Settings
        The validated settings.
    config : NodeConfig, optional
        The node configuration (AE policies, destinations); read from the settings' YAML once,
        here, when not given. Every part of the node uses this one copy.
    """

    def __init__(self, settings: Settings, config: NodeConfig | None = None) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.config = config if config is not None else settings.node_config()
        self.policy = AssociationPolicy(self.config, settings.quiet_seconds)
        self.db = Database(settings.database_url)
        upgrade(self.db)
        self.spool = LocalSpool(settings.spool_dir, settings.min_free_bytes)
        self.publisher = Publisher(
            self.db, make_job_queue(settings, self.db), settings.publish_retry_seconds
        )
        self.tracker = CompletenessTracker(self.db, self.policy, self.publisher.wake)
        self.completeness = CompletenessLoop(self.tracker)
        self.scp = StorageSCP(
            settings,
            self.policy,
            Ingest(self.db, self.spool, self.tracker.hold),
            self.tracker.association_released,
        )
        self.delivery = DeliveryLoop(settings, self.db, self.config)
        self._http: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None

    def start(self) -> None:
        """Start every part; returns once the SCP and HTTP server listen."""
        if not self.policy.restricted:
            LOGGER.warning("no ae_policies configured: any calling AE may store to this node")
        self.publisher.start()
        self.completeness.start()
        self.delivery.start()
        self.scp.start()
        self._start_http()
        self.publisher.wake()

    def _start_http(self) -> None:
        config = uvicorn.Config(
            create_app(self.db, self.settings, self.config, self.publisher.wake, self.scp.refusals),
            host=self.settings.http_host,
            port=self.settings.http_port,
            log_level="warning",
            access_log=False,
        )
        self._http = uvicorn.Server(config)
        self._http_thread = threading.Thread(target=self._http.run, name="http", daemon=True)
        self._http_thread.start()
        while not self._http.started and self._http_thread.is_alive():
            threading.Event().wait(0.05)
        if not self._http.started:
            raise RuntimeError(f"HTTP server could not start on port {self.settings.http_port}")
        LOGGER.info("HTTP API on http://%s:%d", self.settings.http_host, self.http_port)

    @property
    def http_port(self) -> int:
        """The bound HTTP port (useful when configured as 0)."""
        if self._http is None or not self._http.servers:
            raise RuntimeError("HTTP server not started")
        return int(self._http.servers[0].sockets[0].getsockname()[1])

    def stop(self) -> None:
        """Stop accepting, then let the background loops finish."""
        self.scp.stop()
        if self._http is not None:
            self._http.should_exit = True
        if self._http_thread is not None:
            self._http_thread.join(timeout=10)
        self.completeness.stop()
        self.delivery.stop()
        self.publisher.stop()
        self.db.dispose()
