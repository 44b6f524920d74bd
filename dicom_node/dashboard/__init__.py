"""The queue dashboard: pages, their JSON API, actions, and ``/metrics``.

:func:`mount_dashboard` adds it to the service's app (:func:`dicom_node.api.create_app`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from dicom_node.config import NodeConfig, Settings
from dicom_node.dashboard.auth import credentials_from
from dicom_node.dashboard.context import Dashboard
from dicom_node.dashboard.metrics import make_registry
from dicom_node.dashboard.pages import page_router
from dicom_node.dashboard.queue_stats import QueueInspector, make_inspector
from dicom_node.dashboard.routes import action_router, read_router, session_router
from dicom_node.db import Database
from dicom_node.scp import Refusals

STATIC = Path(__file__).with_name("static")


def _nothing() -> None:
    """Default ``on_job``: the publisher's periodic sweep finds new jobs anyway."""


def mount_dashboard(
    app: FastAPI,
    db: Database,
    settings: Settings,
    config: NodeConfig,
    on_job: Callable[[], None] | None = None,
    queues: QueueInspector | None = None,
    refusals: Refusals | None = None,
) -> Dashboard:
    """Add the dashboard's pages, JSON API, actions and ``/metrics`` to ``app``.

    Parameters
    ----------
    app : FastAPI
        The service's app.
    db : Database
        The service database.
    settings : Settings
        Validated settings (credentials, queue names, read access, patient-data display).
    config : NodeConfig
        AE policies and destinations, read once at start (shown, and used by the actions).
    on_job : callable, optional
        Called after an action committed a new job (wakes the outbox publisher).
    queues : QueueInspector, optional
        Queue inspector; by default RabbitMQ's or the embedded queue's per the settings.
    refusals : Refusals, optional
        The DICOM listener's refusal counts, when it runs in this process (``/metrics``).

    Returns
    -------
    Dashboard
        The shared context of the routes.
    """
    dash = Dashboard(
        db=db,
        settings=settings,
        config=config,
        creds=credentials_from(settings),
        queues=queues or make_inspector(settings, db),
        on_job=on_job or _nothing,
    )
    app.include_router(read_router(dash, make_registry(db, dash.queues, refusals)))
    app.include_router(action_router(dash))
    app.include_router(session_router(dash))
    app.include_router(page_router(dash))
    app.mount("/dashboard/static", StaticFiles(directory=STATIC), name="dashboard-static")
    return dash
