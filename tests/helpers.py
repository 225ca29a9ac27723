"""Small helpers shared by tests that start whole stacks."""

from __future__ import annotations

import asyncio
import time

from onepiece.ports import free_port

__all__ = ["SYNTHETIC_PARAMS", "chain3", "free_port"]


# The job parameters the test workflows declare (append it: a TOML table takes the keys after it):
# a label, and what the synthetic stages read.
SYNTHETIC_PARAMS = """
[params.prompt]
type = "string"
max_length = 200
[params.steps]
type = "integer"
default = 1
minimum = 1
maximum = 1000
[params.work]
type = "map"
minimum = 0.0
maximum = 1000.0
"""


def chain3(name: str, b_service: float) -> str:
    """A synthetic workflow a -> b -> c whose middle stage takes ``b_service`` seconds."""
    return f"""
name = "{name}"
result = "c"
[stages.a]
kind = "synthetic"
outputs = ["x"]
[stages.a.synthetic]
service_time = 0.01
output_bytes = 1024
[stages.b]
kind = "synthetic"
after = ["a"]
outputs = ["y"]
[stages.b.synthetic]
service_time = {b_service}
output_bytes = 1024
[stages.c]
kind = "synthetic"
after = ["b"]
[stages.c.synthetic]
service_time = 0.01
""" + SYNTHETIC_PARAMS


async def until(cond, timeout: float = 60.0, what: str = "condition"):
    """Poll ``cond`` every 50 ms until it returns something true (returned), or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)
    return value

