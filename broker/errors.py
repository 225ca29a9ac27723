"""Errors raised by the broker.

    BrokerError
    └── CoreError              the scheduling core refused an event
        ├── UnknownWorker      a message from a worker id the core does not know
        │                      (the I/O layer tells the worker to re-register)
        ├── UnknownJob         a client asked about a job id the core does not know
        └── IllegalTransition  a state change outside the transition table: a bug

Stale or duplicate messages from workers are not errors: the core answers
them with a ``Stale`` marker instead (see ``broker.core``).
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base class for every error the broker raises."""


class CoreError(BrokerError):
    """The scheduling core refused an event (unknown stage or workflow, bad argument)."""


class UnknownWorker(CoreError):
    """A worker id that is not registered (never was, expired, or disconnected)."""

    def __init__(self, worker_id: str) -> None:
        super().__init__(f"unknown worker {worker_id!r}: register first")
        self.worker_id = worker_id


class UnknownJob(CoreError):
    """A job id the core does not hold."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"unknown job {job_id!r}")
        self.job_id = job_id


class IllegalTransition(CoreError):
    """A task or job state change that the transition table forbids: a bug in the core."""
