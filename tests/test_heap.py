"""onepiece.heap: a service's start-up heap is frozen, and garbage made later is still collected."""

from __future__ import annotations

import subprocess
import sys

# In a process of its own: freezing is process-wide, and pytest's heap must not be frozen.
SCRIPT = r"""
import gc, weakref
import torch  # a worker's start-up heap: imports and a model
from onepiece.heap import freeze_startup_heap

class Node:
    pass

alive = [Node() for _ in range(1000)]
frozen = freeze_startup_heap()
assert frozen >= 100_000, frozen          # torch alone is well over 100k tracked objects
assert gc.get_freeze_count() == frozen
tracked = len(gc.get_objects())
assert tracked < 1000, tracked            # a full pass now walks only what came after
a, b = Node(), Node()
a.other, b.other = b, a                   # a cycle made after start-up
gone = weakref.ref(a)
del a, b
gc.collect()
assert gone() is None, "garbage made after the freeze was not collected"
assert len(alive) == 1000
print("ok")
"""


def test_the_start_up_heap_is_frozen_and_later_garbage_still_collected():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
