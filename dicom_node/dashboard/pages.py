"""Server-rendered pages; each polls its own fragment (``X-Partial: 1``) for live updates.

A page renders its live region from the same functions as the JSON API; the page script asks for
the fragment again every few seconds and swaps it in, so numbers change without a reload.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from dicom_node import __version__
from dicom_node.dashboard import operations
from dicom_node.dashboard.context import Dashboard
from dicom_node.dashboard.queries import search_studies
from dicom_node.dashboard.routes import reader
from dicom_node.db import StudyState

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))
STATES = [s.value for s in StudyState]


def fmt_ms(value: float | None) -> str:
    """Milliseconds for people: ``850 ms``, ``12.3 s``, ``4.2 min``."""
    if value is None:
        return "–"
    if value < 1000:
        return f"{value:.0f} ms"
    if value < 120_000:
        return f"{value / 1000:.1f} s"
    return f"{value / 60_000:.1f} min"


def fmt_setting(value: Any) -> str:
    """A setting as it is written in the environment: ``true``/``false``, lists comma-separated,
    unset (``None``) and empty lists blank."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ", ".join(fmt_setting(v) for v in value)
    return str(value)


TEMPLATES.env.filters["ms"] = fmt_ms
TEMPLATES.env.filters["setting"] = fmt_setting


def _render(request: Request, page: str, title: str, **context: Any) -> HTMLResponse:
    partial = request.headers.get("x-partial") == "1"
    name = f"_{page}.html" if partial else f"{page}.html"
    context.update(title=title, page=page, version=__version__, states=STATES)
    return TEMPLATES.TemplateResponse(request, name, context)


def page_router(dash: Dashboard) -> APIRouter:
    """The HTML pages under ``/dashboard``."""
    router = APIRouter(include_in_schema=False, dependencies=[Depends(reader(dash))])

    @router.get("/")
    def root() -> Response:
        return RedirectResponse("/dashboard")

    @router.get("/dashboard", response_class=HTMLResponse)
    def overview(request: Request, window: Annotated[int, Query(ge=1, le=10080)] = 60) -> Response:
        data = operations.overview(dash, timedelta(minutes=window))
        return _render(request, "overview", "Overview", data=data, window=window)

    @router.get("/dashboard/studies", response_class=HTMLResponse)
    def studies(
        request: Request,
        state: str | None = None,
        q: Annotated[str | None, Query(max_length=64)] = None,
    ) -> Response:
        total, items = search_studies(dash.db, state or None, q or None, 200, 0)
        return _render(
            request, "studies", "Studies", total=total, items=items, state=state or "", q=q or ""
        )

    @router.get("/dashboard/studies/{study_uid}", response_class=HTMLResponse)
    def study(request: Request, study_uid: str) -> Response:
        detail = operations.study_detail(dash, study_uid)
        if detail is None:
            raise HTTPException(404, "no such study")
        return _render(request, "study", "Study", d=detail)

    @router.get("/dashboard/failures", response_class=HTMLResponse)
    def failures(request: Request, include_history: bool = False) -> Response:
        data = operations.failures_out(dash, include_history, 200)
        return _render(request, "failures", "Failures", data=data, include_history=include_history)

    @router.get("/dashboard/config", response_class=HTMLResponse)
    def config(request: Request) -> Response:
        return _render(request, "config", "Configuration", cfg=operations.config_out(dash))

    return router
