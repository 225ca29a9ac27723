"""The Node Manager: load signals, allocation policies, and launchers that start and drain workers.

``policy`` decides without I/O, ``signals`` turns the broker's counters into
what a policy reads, ``service.Manager`` runs the control loop beside the
broker, and ``launcher`` (local processes) / ``compose`` (docker compose)
carry the decisions out.
"""

from .launcher import Launcher, LocalLauncher, WorkerHandle
from .policy import (Change, NoScaling, Policy, PolicyConfig, PolicyError, ProportionalPolicy, StageSignals,
                     StaticPolicy)
from .service import Manager, default_cpu_slots, default_gpu_slots
from .signals import LoadTimes, SignalReader

__all__ = [
    "Change",
    "Launcher",
    "LoadTimes",
    "LocalLauncher",
    "Manager",
    "NoScaling",
    "Policy",
    "PolicyConfig",
    "PolicyError",
    "ProportionalPolicy",
    "SignalReader",
    "StageSignals",
    "StaticPolicy",
    "WorkerHandle",
    "default_cpu_slots",
    "default_gpu_slots",
]
