"""The simulated provider in-process: plays an engine plan with the injected clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import ClassVar

from setpoint.clock import Clock
from setpoint.config.schema import SimulatedProviderConfig
from setpoint.errors import ProviderResponseError
from setpoint.providers.base import error_from_status
from setpoint.providers.simulated.engine import SimPlan, SimulatedEngine
from setpoint.types import Reply, UpstreamCall

__all__ = ["SimulatedProvider"]


class _PlanStream:
    __slots__ = ("_clock", "_name", "_plan", "_closed")

    def __init__(self, name: str, plan: SimPlan, clock: Clock) -> None:
        self._name = name
        self._plan = plan
        self._clock = clock
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for ev in self._plan.events:
            if self._closed:
                return
            if ev.delay_s > 0:
                await self._clock.sleep(ev.delay_s)
            yield ev.data
        if self._plan.is_cut and not self._closed:
            raise ProviderResponseError(f"upstream {self._name} closed the stream mid-answer")

    async def aclose(self) -> None:
        self._closed = True


class SimulatedProvider:
    system: ClassVar[str] = "setpoint.simulated"  # gen_ai.system in traces

    def __init__(self, name: str, cfg: SimulatedProviderConfig, clock: Clock) -> None:
        self.name = name
        self._engine = SimulatedEngine(cfg, name)
        self._clock = clock

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def send(self, call: UpstreamCall) -> Reply:
        if call.path == "/embeddings":
            plan = self._engine.plan_embeddings(call.body)
        else:
            plan = self._engine.plan_chat(call.body, call.is_stream)
        if plan.delay_s > 0:
            await self._clock.sleep(plan.delay_s)
        if plan.status != 200:
            raise error_from_status(self.name, plan.status, plan.headers, plan.body or b"")
        if call.is_stream and call.path != "/embeddings":
            return Reply(status=200, stream=_PlanStream(self.name, plan, self._clock))
        return Reply(status=200, body=plan.body)
