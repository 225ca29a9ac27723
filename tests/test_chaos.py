"""The chaos soak, short: no job hangs and none is lost while workers and the broker are SIGKILLed.

Runs ``bench/chaos.py --quick --seconds 60`` as a subprocess: a broker
process, a Node Manager process and two workers per stage, first over
``shm`` then over ``tcp`` (30 s of chaos each, after a 20 s no-chaos
baseline), with workers SIGKILLed every few seconds (while running and
right after finishing), the broker SIGKILLed and restarted once per
transport, and junk sent to the control port. Then it reads the bench's
JSON and asserts what must hold whatever the machine's speed: no job lost,
none with two results, no process and no /dev/shm name left behind, and
every failure's reason names a stage. Timing (p95 under chaos against the
baseline) is a benchmark figure, not asserted here.

Synthetic workflow only (``synthetic3``): the Wan2.1 stages would add six
more stages of two model-loading workers each, and the model loads again
after every kill, which on a 2-core machine roughly doubles the run and
its CPU use. ``python bench/chaos.py --quick`` covers ``wan_i2v`` too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _processes_under(folder: Path) -> list[int]:
    """PIDs whose command line names ``folder`` (the bench passes it to every process as --data-dir)."""
    needle = str(folder).encode()
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if needle in f.read():
                        found.append(int(name))
            except OSError:
                continue
    return found


def test_chaos_soak_loses_nothing_duplicates_nothing_leaks_nothing(tmp_path):
    out = tmp_path / "chaos.json"
    work = tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "bench" / "chaos.py"), "--quick", "--seconds", "60",
           "--workflows", "synthetic3", "--drain-seconds", "90", "--json", str(out), "--work-dir", str(work)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=800)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # the bench stops what it started, by PID
        try:
            output, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"the chaos bench did not finish in time:\n{output[-4000:]}")
    finally:
        for pid in _processes_under(work):  # nothing of the bench's survives a failing test either
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert out.exists(), f"no JSON (exit status {proc.returncode}):\n{output[-4000:]}"
    result = json.loads(out.read_text())
    tail = output[-4000:]
    assert result["error"] is None, f"{result['error']}\n{tail}"
    assert set(result["transports"]) == {"shm", "tcp"}
    tot = result["total"]
    assert tot["submitted"] > 0 and tot["kills"].get("broker", 0) >= 2, tail
    assert sum(n for k, n in tot["kills"].items() if k != "broker") > 0, tail
    assert tot["lost"] == 0, f"lost jobs: {tot['lost_jobs'][:5]}\n{tail}"
    assert tot["duplicated"] == 0, f"duplicated jobs: {tot['duplicated_jobs'][:5]}\n{tail}"
    assert tot["leaked_processes"] == 0 and tot["leaked_shm"] == 0, tail
    unnamed = [f for f in tot["failures"] if not f["names_stage"]]
    assert not unnamed, f"failures whose reason names no stage: {unnamed[:5]}"
    assert not _processes_under(work)
