"""`/metrics`: this worker's request metrics and live state, merged with the other workers' snapshots."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from setpoint.errors import AuthenticationError, SetpointError, StateBackendError
from setpoint.keys.model import key_matches
from setpoint.observability.exposition import render
from setpoint.observability.metrics import (
    Gauge,
    RequestMetrics,
    join,
    merge_snapshots,
    read_peer_snapshots,
    write_snapshot,
)
from setpoint.policy.resilience.breaker import BreakerState
from setpoint.policy.stages.budget import BudgetStage, budget_line
from setpoint.proxy.routes import error_response

if TYPE_CHECKING:
    from setpoint.proxy.gateway import Gateway

__all__ = ["MetricsService"]

log = logging.getLogger("setpoint.metrics")

_BREAKER_VALUE = {BreakerState.CLOSED: 0.0, BreakerState.HALF_OPEN: 1.0, BreakerState.OPEN: 2.0}
_SNAPSHOT_EVERY_S = 2.0
_STALE_AFTER_S = 10.0  # a snapshot file not refreshed for this long is ignored (dead worker, reused pid)
_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsService:
    def __init__(self, gw: Gateway) -> None:
        self._gw = gw
        self.metrics = RequestMetrics()
        self._dir: Path = gw.runtime.data_dir / "metrics"
        self._task: asyncio.Task[None] | None = None

    def gauges(self) -> dict[str, Gauge]:
        res = self._gw.resilience
        breaker = {name: _BREAKER_VALUE[b.state] for name, b in res.breakers.items()}
        limit = {name: float(lim.limit) for name, lim in res.limiters.items()}
        inflight = {name: float(n) for name, n in res.stats.inflight.items()}
        queued = {name: float(lim.queued) for name, lim in res.limiters.items()}
        shed = {name: float(lim.shed) for name, lim in res.limiters.items()}
        return {
            "setpoint_breaker_state": breaker,
            "setpoint_concurrency_limit": limit,
            "setpoint_inflight": inflight,
            "setpoint_queue_depth": queued,
            "setpoint_shed": shed,
            "setpoint_retry_budget_available": {"": res.budget.available()},
            "setpoint_spool_pending_bytes": {"": float(self._gw.request_log.pending_bytes)},
            "setpoint_spool_lag_seconds": {"": round(self._gw.request_log.lag_s, 3)},
        }

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._snapshots())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(OSError):
            (self._dir / f"{os.getpid()}.json").unlink(missing_ok=True)

    async def _snapshots(self) -> None:
        """Publish this worker's numbers for scrapes answered by its siblings."""
        while True:
            try:
                write_snapshot(self._dir, self.metrics.snapshot(self.gauges()))
            except OSError as exc:
                log.warning("could not write the metrics snapshot: %s", exc)
            await asyncio.sleep(_SNAPSHOT_EVERY_S)

    async def budget_gauges(self) -> dict[str, Gauge]:
        """Limit and remaining money of named budgets and of the budget entities this worker saw."""
        stage = self._gw.stages.get("budget")
        if not isinstance(stage, BudgetStage):
            return {}
        now = self._gw.runtime.clock.now()
        watched = stage.watched()
        lines = [budget_line(i, rule, entity, now) for i, rule, entity in watched]
        try:
            spent = await self._gw.runtime.state.spent(lines, now)
        except StateBackendError:
            return {}  # the store is down: no budget numbers rather than wrong ones
        limits: Gauge = {}
        remaining: Gauge = {}
        for (_, rule, entity), used in zip(watched, spent, strict=True):
            key = join(rule.scope, entity, rule.period)
            limit = round(rule.limit_usd * 1_000_000)
            limits[key] = limit / 1e6
            remaining[key] = (limit - used) / 1e6
        return {"setpoint_budget_limit_usd": limits, "setpoint_budget_remaining_usd": remaining}

    def exposition(self, shared: dict[str, Gauge] | None = None) -> bytes:
        own = (os.getpid(), self.metrics.snapshot(self.gauges()))
        horizon = time.time() - _STALE_AFTER_S
        peers = [(pid, snap) for pid, snap in read_peer_snapshots(self._dir, newer_than=horizon)]
        snap = merge_snapshots([own, *peers]) if peers else dict(own[1])
        if shared:
            snap["gauges"] = {**snap["gauges"], **shared}
        return render(snap, per_worker=bool(peers))

    async def handle(self, request: web.Request) -> web.Response:
        try:
            self._authorize(request)
        except SetpointError as err:
            return error_response(err)
        shared = await self.budget_gauges()
        if _has_peers(self._dir):
            body = await asyncio.to_thread(self.exposition, shared)
        else:
            body = self.exposition(shared)
        return web.Response(body=body, headers={"Content-Type": _CONTENT_TYPE})

    def _authorize(self, request: web.Request) -> None:
        if self._gw.runtime.config.observability.metrics_auth == "none":
            return
        master = self._gw.runtime.master_key
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not key_matches(given, master):
            raise AuthenticationError("metrics need the master key as a bearer token")


def _has_peers(directory: Path) -> bool:
    try:
        return sum(1 for _ in directory.glob("*.json")) > 1
    except OSError:
        return False
