"""A denoise worker that spans ``k`` processes (sequence parallelism, worker side).

With ``sp = k > 1`` the worker process is rank 0 of a *worker group*: the only
rank the broker and the data plane see. At load it spawns ``k - 1`` followers
(ranks ``1 .. k-1``); each loads the same components (model, identity, dtype;
on CUDA rank ``r`` uses the ``r``-th device from the worker's own, on CPU all
use the CPU and share its threads), then all join one ``torch.distributed``
group (gloo on CPU, nccl on CUDA, ``tcp://127.0.0.1:<free port>``) and wrap
their transformer in ``stages.wan.parallel.SequenceParallel``.

Per task, rank 0 sends each follower a small header over its pipe (the job's
parameters, and the name, shape and dtype of each input tensor: the
conditioning and the chosen start state), then broadcasts those tensors (as
raw bytes), and every rank runs ``compute.denoise``; only rank 0's output is
kept. The header travels over the pipe, not the group, because an idle
follower waits there for hours and every collective is bounded.

Invariants:

* Every rank makes the same calls in the same order, so the collectives of the
  forward and of the steps below match up. Each per-step decision is rank 0's,
  broadcast: before the first step, and after each step (when ``denoise`` asks
  ``yield_now``), one two-int collective carries *cancel* (``should_stop``) and
  *yield* (the drain handoff); the cancel after step ``i`` answers the
  ``should_stop`` before step ``i + 1``. So all ranks stop at the same boundary.
* ``snapshot`` (checkpoints) and ``on_step`` (progress) run on rank 0 only: a
  checkpoint copies rank 0's latents and scheduler, which equal every rank's.
* ``ValueError`` and ``Cancelled`` are deterministic (the same inputs on every
  rank raise them at the same point, before or between collectives): the group
  stays in step and serves the next task. Any other exception, on any rank, means
  the group is lost (a peer died or hung, or a rank failed alone).
* A lost group is never reused. Rank 0 raises ``GroupLost`` (the worker reports
  a crash: FAILED, retryable, so the broker re-runs the task elsewhere from its
  last checkpoint), SIGKILLs its followers and, ``LOST_EXIT_DELAY_S`` later,
  ends the worker process with ``EXIT_GROUP_LOST`` (``os._exit``: the delay lets
  the worker's loop queue and flush the FAILED; were it lost anyway, the
  broker's liveness check would re-run the task all the same). A follower whose
  group is lost exits with ``EXIT_GROUP_LOST`` at once.
* Followers never outlive rank 0: each watches its pipe (EOF when rank 0's
  process ends) and its parent pid, and rank 0 stops them at exit (``atexit``:
  the worker's drain or stop ends the process normally).

Every wait and its bound:

==========================================  =============================================================
wait                                        bound
==========================================  =============================================================
rank 0: the followers' loads ("loaded")     the worker's ``load_timeout_s`` (the worker gives up and
                                            exits; the followers then see their parent gone); a
                                            follower that fails or dies answers at once (error or EOF)
any rank: joining the group (rendezvous)    ``GROUP_TIMEOUT`` (all ranks have loaded by then: the skew
                                            is rank 0's own load)
any rank: every collective (inputs, steps,  ``GROUP_TIMEOUT`` (gloo raises; nccl's watchdog aborts the
the forward's exchanges)                    process); a peer that died makes it fail sooner (its
                                            sockets close)
a follower: the next task                   until rank 0 sends one or stops it; its death is seen within
                                            ``PARENT_POLL_S`` (pipe EOF, or the parent pid changing)
rank 0: stopping followers at exit          ``STOP_TIMEOUT_S`` for all of them, then SIGKILL
rank 0: a lost group to the process's end   ``LOST_EXIT_DELAY_S``
==========================================  =============================================================
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from datetime import timedelta

import torch
import torch.distributed as dist

from onepiece.ports import free_port

from .compute import STATE_PREFIX, Cancelled, WanParams, denoise
from .models import WanComponents, load_components
from .parallel import SequenceParallel, process_group

__all__ = ["EXIT_GROUP_LOST", "SP_SIZES", "DenoiseGroup", "GroupLost"]

log = logging.getLogger("onepiece.sp")

SP_SIZES = (1, 2, 4, 8)  # the ranks a worker group may have
GROUP_TIMEOUT = timedelta(seconds=120)  # every collective and the rendezvous
PARENT_POLL_S = 1.0  # how often an idle follower checks that rank 0 is still there
STOP_TIMEOUT_S = 10.0  # stopping the followers at exit, all of them together
LOST_EXIT_DELAY_S = 1.0  # from a lost group to rank 0's exit: the FAILED leaves meanwhile
EXIT_GROUP_LOST = 70  # exit status of a rank whose group is lost (EX_SOFTWARE)
_DETERMINISTIC = (ValueError, Cancelled)  # raised alike on every rank: the group stays in step


class GroupLost(RuntimeError):
    """The worker group can no longer run a task (a rank died, hung or failed alone);
    retryable elsewhere. The worker process ends shortly after this is raised."""


def check_sp(k: int) -> None:
    """Refuse a group size other than ``SP_SIZES``."""
    if k not in SP_SIZES:
        raise ValueError(f"sp: {k} ranks; must be one of {', '.join(map(str, SP_SIZES))}")


def rank_device(device: str | None, rank: int) -> torch.device:
    """The device of ``rank`` given the worker's ``device`` (None: cuda when present):
    on CUDA the ``rank``-th device from the worker's own, else the CPU."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type != "cuda":
        return dev
    return torch.device("cuda", (dev.index or 0) + rank)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s storage as a flat uint8 tensor: one broadcast path for every dtype."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


class _Steps:
    """The per-step decisions of one task on one rank (see the module invariants).
    Rank 0 passes its ``should_stop`` and ``yield_now``; followers pass None and
    take rank 0's answers."""

    def __init__(self, device: torch.device, should_stop: Callable[[], bool] | None = None,
                 yield_now: Callable[[], bool] | None = None):
        self.device = device
        self._should_stop = should_stop
        self._yield_now = yield_now
        self._stop_next: bool | None = None  # the cancel decided with the last yield, for the next step

    def _decide(self, ask_yield: bool) -> tuple[bool, bool]:
        stop = yld = False
        if self._should_stop is not None:
            stop = bool(self._should_stop())
            yld = bool(ask_yield and self._yield_now is not None and self._yield_now())
        flags = torch.tensor([stop, yld], dtype=torch.int32, device=self.device)
        dist.broadcast(flags, src=0)
        return bool(flags[0]), bool(flags[1])

    def should_stop(self) -> bool:
        stop, self._stop_next = self._stop_next, None
        return self._decide(False)[0] if stop is None else stop

    def yield_now(self) -> bool:
        self._stop_next, yld = self._decide(True)
        return yld


def _receive(specs: list, device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors rank 0 broadcasts after a header naming them (name, shape, dtype)."""
    out = {}
    for name, shape, dtype_name in specs:
        dtype = getattr(torch, dtype_name)
        t = torch.empty(shape, dtype=dtype, device=device)
        if t.numel():
            dist.broadcast(_as_bytes(t), src=0)  # the view shares t's storage
        out[name] = t
    return out


def _next_message(conn, parent: int) -> dict | None:
    """A follower's wait for rank 0's next message; None when told to stop or rank 0 is gone."""
    while not conn.poll(PARENT_POLL_S):
        if os.getppid() != parent:
            return None
    try:
        message = conn.recv()
    except (EOFError, OSError):
        return None
    return None if message["op"] == "stop" else message


def _follower_main(rank: int, k: int, port: int, model: str, identity: str | None, device: str | None,
                   dtype: str | None, threads: int, conn) -> None:
    """A follower rank (a spawned process): load, say so, join the group, then run
    every task rank 0 announces until it stops it or goes away."""
    parent = os.getppid()
    dev = rank_device(device, rank)
    try:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        else:
            torch.set_num_threads(threads)
        components = load_components(model, identity=identity, device=dev, dtype=dtype)
    except BaseException:  # noqa: BLE001 - reported to rank 0, which fails the load
        conn.send({"op": "error", "reason": f"rank {rank}: {traceback.format_exc()}"})
        raise
    conn.send({"op": "loaded"})
    backend = "nccl" if dev.type == "cuda" else "gloo"
    try:
        with process_group(rank, k, init_method=f"tcp://127.0.0.1:{port}", backend=backend,
                           timeout=GROUP_TIMEOUT):
            SequenceParallel(components.transformer)
            while (message := _next_message(conn, parent)) is not None:
                tensors = _receive(message["tensors"], dev)
                state = {n: t for n, t in tensors.items() if n.startswith(STATE_PREFIX)} or None
                conditioning = {n: t for n, t in tensors.items() if not n.startswith(STATE_PREFIX)}
                steps = _Steps(dev)
                try:
                    denoise(components, conditioning, WanParams.from_dict(message["params"]), state=state,
                            should_stop=steps.should_stop, yield_now=steps.yield_now)
                except _DETERMINISTIC:
                    continue  # rank 0 raised the same at the same point: still in step
    except BaseException:  # noqa: BLE001 - the group is lost: say why, end now (no teardown to hang in)
        log.error("sequence-parallel rank %d: group lost\n%s", rank, traceback.format_exc())
        os._exit(EXIT_GROUP_LOST)


class _Follower:
    def __init__(self, process: multiprocessing.Process, conn):
        self.process, self.conn = process, conn


class DenoiseGroup:
    """Rank 0's side of a worker group of ``k`` ranks (see the module docstring).

    ``start()`` (in the worker's load) spawns the followers and returns rank 0's
    components, their transformer split; ``denoise()`` (in the worker's task
    thread, one task at a time) runs a task on every rank; ``close()`` stops the
    followers (also registered to run at exit).
    """

    def __init__(self, k: int, *, model: str, identity: str | None, device: str | None, dtype: str | None):
        check_sp(k)
        if k < 2:
            raise ValueError("a worker group has at least 2 ranks; sp=1 needs none")
        self.k, self.model, self.identity, self.dtype = k, model, identity, dtype
        self.device_setting = device
        self.device = rank_device(device, 0)
        self._followers: list[_Follower] = []
        self._lock = threading.Lock()  # one task at a time: the ranks' collectives must pair up
        self._group = ExitStack()  # rank 0's membership of the group, left by close()
        self.lost: str | None = None

    @property
    def pids(self) -> list[int]:
        """The follower processes' ids (ranks 1..k-1)."""
        return [f.process.pid for f in self._followers]

    def start(self) -> WanComponents:
        """Spawn the followers, load rank 0's components while they load theirs, wait for
        them (an error or death of one fails the load), join the group and split the
        transformer."""
        if self.device.type == "cuda":
            if torch.cuda.device_count() < (self.device.index or 0) + self.k:
                raise ValueError(f"sp={self.k} from {self.device} needs {self.k} CUDA devices from it; "
                                 f"{torch.cuda.device_count()} visible")
            torch.cuda.set_device(self.device)
            threads = 0
        else:  # the ranks share the CPU's threads
            threads = max(1, torch.get_num_threads() // self.k)
            torch.set_num_threads(threads)
        port = free_port()  # another process may take it first: the group's load then fails, saying so
        ctx = multiprocessing.get_context("spawn")
        atexit.register(self.close)
        try:
            for rank in range(1, self.k):
                ours, theirs = ctx.Pipe()
                process = ctx.Process(target=_follower_main, name=f"sp-rank-{rank}", daemon=True,
                                      args=(rank, self.k, port, self.model, self.identity, self.device_setting,
                                            self.dtype, threads, theirs))
                process.start()
                theirs.close()  # the follower's end lives in the follower alone: its death is our EOF
                self._followers.append(_Follower(process, ours))
            components = load_components(self.model, identity=self.identity, device=self.device, dtype=self.dtype)
            for rank, f in enumerate(self._followers, 1):
                try:
                    message = f.conn.recv()
                except EOFError:
                    raise RuntimeError(f"sp rank {rank} (pid {f.process.pid}) died while loading") from None
                if message["op"] != "loaded":
                    raise RuntimeError(f"sp rank {rank} failed to load: {message.get('reason')}")
            self._group.enter_context(process_group(0, self.k, init_method=f"tcp://127.0.0.1:{port}",
                                                    backend="nccl" if self.device.type == "cuda" else "gloo",
                                                    timeout=GROUP_TIMEOUT))
            SequenceParallel(components.transformer)
        except BaseException:
            self.close()
            raise
        log.info("sequence parallel: %d ranks (followers %s) on %s", self.k, self.pids, self.device)
        return components

    def denoise(self, components: WanComponents, conditioning: Mapping[str, torch.Tensor], params: dict,
                *, state: Mapping[str, torch.Tensor] | None, on_step=None, should_stop=None, snapshot=None,
                yield_now=None) -> dict[str, torch.Tensor]:
        """``compute.denoise`` on every rank; rank 0's result. ``params`` is the job's
        parameter dict (it travels to the followers as it is)."""
        with self._lock:
            if self.lost is not None:
                raise GroupLost(f"sequence-parallel group lost earlier: {self.lost}")
            p = WanParams.from_dict(params)
            tensors = {**conditioning, **(state or {})}
            header = {"op": "task", "params": params,
                      "tensors": [(n, list(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in tensors.items()]}
            try:
                for f in self._followers:
                    f.conn.send(header)
                for t in tensors.values():
                    if t.numel():
                        dist.broadcast(_as_bytes(t.to(self.device)), src=0)
                steps = _Steps(self.device, should_stop or (lambda: False), yield_now)
                return denoise(components, conditioning, p, state=state, on_step=on_step,
                               should_stop=steps.should_stop, snapshot=snapshot, yield_now=steps.yield_now)
            except _DETERMINISTIC:
                raise
            except Exception as exc:
                self._lose(f"{type(exc).__name__}: {exc}")
                raise GroupLost(f"sequence-parallel group of {self.k} ranks lost: {type(exc).__name__}: {exc}") \
                    from exc

    def _lose(self, reason: str) -> None:
        """The group is gone: kill the followers now, end this process shortly (module docstring)."""
        self.lost = reason
        log.error("sequence-parallel group lost (%s): killing the followers; the worker exits with %d in %.1f s",
                  reason, EXIT_GROUP_LOST, LOST_EXIT_DELAY_S)
        for f in self._followers:
            if f.process.is_alive():
                f.process.kill()
        for f in self._followers:
            f.process.join(STOP_TIMEOUT_S)

        def leave() -> None:
            time.sleep(LOST_EXIT_DELAY_S)
            logging.shutdown()
            os._exit(EXIT_GROUP_LOST)

        threading.Thread(target=leave, name="sp-group-lost", daemon=True).start()

    def close(self) -> None:
        """Stop the followers (ask, then SIGKILL what is left after ``STOP_TIMEOUT_S``) and
        leave the group. Idempotent; safe while a load or a task is in flight (that one
        then fails: the group is gone)."""
        atexit.unregister(self.close)
        for f in self._followers:
            try:
                f.conn.send({"op": "stop"})
            except OSError:
                pass  # already gone
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for f in self._followers:
            f.process.join(max(0.0, deadline - time.monotonic()))
            if f.process.is_alive():
                f.process.kill()
                f.process.join()
            f.conn.close()
        if self.lost is None:  # a lost group's teardown may hang or abort: the process ends instead
            self._group.close()
