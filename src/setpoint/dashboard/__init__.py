"""The dashboard at `/ui`: server-rendered pages (jinja2) with a few uPlot charts, admin login.

`mount_dashboard(app, gw)` adds its routes to the gateway's aiohttp application. Request-log numbers
come from a `setpoint.logstore.reader.LogReader`; live state from the gateway's own objects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from setpoint.dashboard.views import Dashboard, ReaderFactory

if TYPE_CHECKING:
    from setpoint.proxy.gateway import Gateway

__all__ = ["Dashboard", "mount_dashboard"]


def _reader_factory(gw: Gateway) -> ReaderFactory | None:
    """How to open a reader on the gateway's configured request log."""
    opener = getattr(gw.request_log, "open_reader", None)
    return opener if callable(opener) else None


def mount_dashboard(app: web.Application, gw: Gateway, reader_factory: ReaderFactory | None = None) -> Dashboard:
    dash = Dashboard(gw, reader_factory if reader_factory is not None else _reader_factory(gw))
    dash.add_routes(app)
    return dash
