"""What the broker and the node manager may ask of each other: two small interfaces.

Neither reaches into the other's attributes. The manager sees a broker as a
:class:`BrokerLink` (``broker.service.Broker`` in the same process,
``manager.remote.RemoteBroker`` over REST from another); the broker sees the
manager that attached itself as a :class:`ManagerLink` (its REST API shows the
allocation, and readiness does not count stages the manager starts on demand).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from stages.workflow import Workflow


class ManagerLink(Protocol):
    def on_demand_stages(self) -> set[str]:
        """Stages scaled to zero on purpose: a worker starts when work comes."""

    def allocation(self) -> dict:
        """Per stage: the target, live, starting and draining workers."""

    def slots(self) -> dict:
        """The slot pools and what holds each slot."""

    def decisions(self, n: int) -> list[dict]:
        """The last ``n`` scaling decisions, newest last."""


class BrokerLink(Protocol):
    workflows: Mapping[str, Workflow]

    def stages(self) -> dict:
        """Per stage: its workers (id, load, capacity, draining, ...), queue length, busy."""

    def stage_signals(self, now: float) -> dict:
        """Per stage: cumulative counters and instantaneous gauges (``broker.core.Core.stage_signals``)."""

    def drain(self, worker_id: str) -> None:
        """Bind nothing new to the worker and tell it to finish and leave."""

    def lost(self, worker_id: str, why: str) -> None:
        """The worker's process exited: re-make its work now (not once its heartbeats lapse)."""

    def attach(self, name: str, extension: ManagerLink) -> None:
        """Show ``extension`` in the broker's API under ``name`` (one at a time)."""

    def detach(self, name: str, extension: ManagerLink) -> None:
        """Undo :meth:`attach`, if ``extension`` is still the one attached."""

    def metrics_registry(self) -> Any:
        """The prometheus_client registry the manager adds its metrics to, or None."""
