"""``rdma``: the double ring over RDMA (pyverbs, from rdma-core), between hosts on one fabric.

The protocol is :mod:`transports.ring`, unchanged; this module supplies its
memory. Per directed connection, registered once when it is made:

* the consumer's *data region* (64 B control + the ring) and the producer's
  128 B *credit region*, both ``LOCAL_WRITE | REMOTE_WRITE`` and never
  ``RELAXED_ORDERING`` (relaxed ordering would let the trailer land first);
* a *staging* region on each side, the source of every RDMA WRITE: the
  producer's holds two of the peer's largest records, the consumer's a few
  credit and flag words. ``Remote.write`` gathers its parts into the next
  free span and posts one ``IBV_WR_RDMA_WRITE`` per record; spans are freed
  in order as completions come back (an RC queue pair completes in order);
* an RC queue pair, moved INIT -> RTR -> RTS with the peer's QPN, PSN,
  GID/LID and MTU from the handshake's offer and answer.

Selective signalling: a write asks for a completion every ``SIGNAL_EVERY``
work requests, and always when, after it, the send queue or the staging
could not take another write of the largest size. So whenever a write finds
no room, a signalled request is in flight and polling the CQ (briefly, with
a deadline) frees room; in the common case nothing waits. Completions are
otherwise reaped from asyncio: the CQ's completion channel fd is registered
with ``loop.add_reader`` (``ibv_get_cq_event``, ``ibv_ack_cq_events``,
``ibv_req_notify_cq``).

How a consumer knows a record has fully landed (ring invariant I4)
-------------------------------------------------------------------
Right after its queue pair reaches RTS, the consumer asks it
``ibv_query_qp_data_in_order(qp, IBV_WR_RDMA_WRITE, 0)`` (pyverbs
``QP.query_data_in_order``). When the answer is 1, the data of one RDMA
WRITE is placed in order, so the trailer's last word lands last and the
consumer polls trailers (``commit = "trailer"``). When it is 0, or pyverbs
cannot ask, or the query fails, every record is committed with
``IBV_WR_RDMA_WRITE_WITH_IMM`` instead (``commit = "imm"``): the producer
writes the record with its trailer's last word zeroed and the record's
offset / 64 as immediate data, the consumer keeps receives posted, and on
the receive completion (which follows placement of all the record's bytes)
it writes that word itself and wakes its receiver: the doorbell comes from
the completion. (That word is the one place where ring.py's I1 bends: the
producer writes it as zero, and not again before the consumer has released
the record, so the consumer's write races with nothing.) The answer carries
the decision to the producer; it is logged (INFO for the first connection,
DEBUG after) and counted in stats(). The ``commit`` option forces either
path.

Doorbells
---------
The side channel rings the consumer right after a write is *posted*, which
over RDMA can be before it lands. A producer whose consumer is asleep
therefore signals that write and rings once more when it completes; a
consumer whose producer waits for credit polls the completion of its 16-byte
credit write before ringing; and each side waits for its own 8-byte "ring
me" flag to land before it looks at the ring and sleeps. (A lost wake-up
would only cost latency: ringtransport's backstop timeouts still apply.)
A sender's close first waits for its posted writes to complete, so the peer
never sees the side channel end before the data.

Rendezvous
----------
A granted region (``transports/grants.py``) is memory of the consumer's
endpoint registered ``LOCAL_WRITE | REMOTE_WRITE`` once, when the pool makes
it, and deregistered when the pool destroys it; the grant's handle is its
address and rkey. The producer RDMA WRITEs the payload into it through the
connection's queue pair, in spans of at most the staging size, before the
PUT record: an RC queue pair executes them in order, so the PUT never lands
before the bytes it announces. (The producer's one copy is into its
registered staging; the NIC moves the bytes from there.)

Errors from verbs (a failed post, a work completion with an error status, a
queue pair in the error state) become PeerGone / TransportError at this
boundary, and mark the connection broken so the waiting side wakes up.
Nothing here imports pyverbs until :meth:`RdmaTransport.open`.

No RDMA traffic has been run on the development machines: the paths that
need a device are written against pyverbs' API (rdma-core 44 to 59+) but
are untested there; see docs/rdma.md.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import dataclasses
import glob
import importlib
import importlib.util
import logging
import mmap
import os
import random
import re
import resource
import socket
import struct
import sys
import time
from collections.abc import Mapping
from typing import Any

from onepiece.credentials import Credential

from .errors import PeerGone, ProtocolError, TransportError, TransportTimeout, TransportUnavailable
from .grants import GrantPool
from .ring import (
    CONTROL_BYTES, CREDIT_BYTES, GRANULE, HEADER, HEADER_BYTES, MAGIC, PAD, SLEEPING_OFFSET,
    TRAILER_KEY, U64, WAITING_OFFSET, RingConfig, record_bytes, slice_parts,
)
from .ringtransport import (
    GRANT_BYTES, GRANT_MIN_BYTES, GrantRegion, Region, RingTransport, Writer, check_spin, ring_config,
)

log = logging.getLogger(__name__)

COMMITS = ("auto", "trailer", "imm")
SQ_DEPTH = 128  # send work requests in flight per connection (capped by the device)
RECV_DEPTH = 256  # receives kept posted for WRITE_WITH_IMM
SIGNAL_EVERY = 32
CONSUMER_STAGING = 4096  # credit and flag words only
POLL_FALLBACK_S = 0.001
ZERO8 = bytes(8)
REGION_HANDLE = struct.Struct("<QI")  # a granted region: address, rkey
FLUSH_OFFSET = WAITING_OFFSET + 8  # an unused word of the data region's control block (the producer's)

# Where distributions install pyverbs for their own python3 (Debian/Ubuntu, Fedora/RHEL, Arch, local builds).
SYSTEM_SITE_DIRS = ("/usr/lib/python3/dist-packages", "/usr/lib64/python3*/site-packages",
                    "/usr/lib/python3*/site-packages", "/usr/local/lib/python3*/dist-packages")
ENUM_MODULES = ("pyverbs.libibverbs_enums", "pyverbs.enums")  # rdma-core >= 59, before 59

FIX_INSTALL = ("install rdma-core's Python bindings from the operating system: `apt-get install rdma-core "
               "ibverbs-utils python3-pyverbs` (Debian/Ubuntu) or `dnf install rdma-core libibverbs-utils "
               "python3-pyverbs` (Fedora/RHEL); or use --transport shm|tcp|auto")
FIX_DEVICE = ("check with `ibv_devices`, `ibv_devinfo` and `rdma link`; load the driver of the adapter "
              "(e.g. mlx5_ib for ConnectX), or create a soft-RoCE device on any Linux box: `modprobe rdma_rxe "
              "&& rdma link add rxe0 type rxe netdev IFACE`; in a container, pass /dev/infiniband; "
              "or use --transport shm|tcp|auto")
FIX_MEMLOCK = ("raise the locked-memory limit: `ulimit -l unlimited`, systemd LimitMEMLOCK=infinity, "
               "docker run --ulimit memlock=-1 (and --cap-add IPC_LOCK)")


# -- finding pyverbs ----------------------------------------------------------

def _import(name: str):
    """The import helper every pyverbs import goes through (tests replace it)."""
    return importlib.import_module(name)


@dataclasses.dataclass
class Verbs:
    """The pyverbs modules this transport uses, imported once."""

    path: str
    device: Any
    pd: Any
    mr: Any
    cq: Any
    qp: Any
    wr: Any
    addr: Any
    enums: Any
    error: type  # PyverbsError: everything pyverbs raises
    free_wrs: bool  # SendWR/SGE/RecvWR lack a working __dealloc__ here, so close() them


_VERBS: Verbs | None = None


def load_pyverbs() -> Verbs:
    """pyverbs, from this interpreter's path or the system python's; TransportUnavailable if missing."""
    global _VERBS
    if _VERBS is None:
        _VERBS = _load()
    return _VERBS


def _load() -> Verbs:
    try:
        package = _import("pyverbs")
    except ImportError as exc:
        package = _load_system_copy(exc)
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        mods = {name: _import(f"pyverbs.{name}") for name in ("device", "pd", "mr", "cq", "qp", "wr", "addr")}
        error = _import("pyverbs.pyverbs_error").PyverbsError
        enums = resolve_enums()
    except ImportError as exc:
        raise TransportUnavailable(f"pyverbs at {package.__path__} is incomplete ({exc}); {FIX_INSTALL}") from exc
    finally:
        # pyverbs.base calls logging.basicConfig() on import, which would turn on
        # INFO logging to stderr for the whole process.
        root.setLevel(level)
        root.handlers[:] = handlers
    free_wrs = "__dealloc" in dir(mods["wr"].SendWR)  # its destructor is misnamed, so it never runs
    return Verbs(path=list(package.__path__)[0], enums=enums, error=error, free_wrs=free_wrs, **mods)


def resolve_enums(import_module=None):
    """The module with the IBV_* constants: ``pyverbs.libibverbs_enums`` (rdma-core 59+) or ``pyverbs.enums``."""
    import_module = import_module or _import
    tried = []
    for name in ENUM_MODULES:
        try:
            module = import_module(name)
        except ImportError as exc:
            tried.append(f"{name}: {exc}")
            continue
        if hasattr(module, "IBV_WR_RDMA_WRITE"):
            return module
        tried.append(f"{name} has no IBV_WR_RDMA_WRITE")
    raise TransportUnavailable(f"pyverbs has no usable enum module ({'; '.join(tried)}); {FIX_INSTALL}")


def system_pyverbs_dirs() -> list[str]:
    """pyverbs packages installed for the system's python3, best candidates first."""
    found = []
    for pattern in SYSTEM_SITE_DIRS:
        for site in sorted(glob.glob(pattern)):
            package = os.path.join(site, "pyverbs")
            if os.path.isfile(os.path.join(package, "__init__.py")) and package not in found:
                found.append(package)
    return found


def _abi_tags(package: str) -> set[str]:
    """CPython versions the package's extension modules are built for, as "3.11"."""
    tags = set()
    for name in os.listdir(package):
        if m := re.search(r"\.cpython-3(\d+)[-.].*so$", name):
            tags.add(f"3.{m.group(1)}")
    return tags


def _load_system_copy(missing: ImportError):
    """Import the distribution's pyverbs package into this interpreter (a virtualenv, usually).

    Only the ``pyverbs`` package is loaded, by location: putting the whole
    system site-packages on sys.path would let its other packages shadow or
    fill in for the virtualenv's.
    """
    packages = system_pyverbs_dirs()
    ours = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not packages:
        raise TransportUnavailable(
            f"rdma transport needs pyverbs, which Python {ours} ({sys.executable}) cannot import ({missing}) "
            f"and which is not installed for the system python3 either; {FIX_INSTALL}") from missing
    for package in packages:
        if ours in _abi_tags(package):
            spec = importlib.util.spec_from_file_location(
                "pyverbs", os.path.join(package, "__init__.py"), submodule_search_locations=[package])
            module = importlib.util.module_from_spec(spec)
            sys.modules["pyverbs"] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules["pyverbs"]
                raise
            log.info("rdma: using the system's pyverbs from %s", package)
            return module
    builds = ", ".join(f"{p} (Python {'/'.join(sorted(_abi_tags(p))) or '?'})" for p in packages)
    raise TransportUnavailable(
        f"the system's pyverbs is built for another Python minor version: {builds}; this interpreter is "
        f"Python {ours} ({sys.executable}). Create the virtualenv from the system python3 (`python3 -m venv`) "
        f"so the minor versions match, or build pyverbs for Python {ours} from rdma-core's source") from missing


# -- the local port and what peers learn about it ----------------------------

@dataclasses.dataclass(frozen=True)
class PortInfo:
    """An RDMA port, as published in the descriptor and the handshake."""

    device: str
    port: int
    link_layer: str  # "InfiniBand" or "Ethernet" (RoCE)
    lid: int
    gid: str  # "xxxx:xxxx:xxxx:xxxx:xxxx:xxxx:xxxx:xxxx"
    gid_index: int
    gid_type: str  # "IB", "RoCEv1", "RoCEv2"
    mtu: int  # enum ibv_mtu: 1 (256 B) .. 5 (4096 B)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> PortInfo:
        try:
            info = cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})
        except (KeyError, TypeError) as exc:
            raise ProtocolError(f"bad rdma port description {d!r:.200}: missing {exc}") from exc
        for f in dataclasses.fields(cls):
            if not isinstance(getattr(info, f.name), int if f.type == "int" else str):
                raise ProtocolError(f"bad rdma port description: {f.name}={getattr(info, f.name)!r}")
        if (info.link_layer not in ("InfiniBand", "Ethernet") or not 1 <= info.mtu <= 5
                or not re.fullmatch(r"[0-9a-fA-F]{4}(:[0-9a-fA-F]{4}){7}", info.gid)):
            raise ProtocolError(f"bad rdma port description {d!r:.200}")
        return info

    @property
    def subnet(self) -> str:
        return self.gid[:19]


@dataclasses.dataclass(frozen=True)
class PeerQP:
    """The far end of a connection: its queue pair and the region we write into."""

    port: PortInfo
    qpn: int
    psn: int
    addr: int
    rkey: int
    nbytes: int

    def as_dict(self) -> dict:
        return {"port": self.port.as_dict(), "qpn": self.qpn, "psn": self.psn, "addr": self.addr,
                "rkey": self.rkey, "bytes": self.nbytes}

    @classmethod
    def from_dict(cls, d: Mapping, nbytes: int) -> PeerQP:
        try:
            peer = cls(PortInfo.from_dict(d["port"]), d["qpn"], d["psn"], d["addr"], d["rkey"], d["bytes"])
        except (KeyError, TypeError) as exc:
            raise ProtocolError(f"bad rdma handshake {d!r:.200}: missing {exc}") from exc
        if not all(isinstance(x, int) and x >= 0 for x in (peer.qpn, peer.psn, peer.addr, peer.rkey, peer.nbytes)):
            raise ProtocolError(f"bad rdma handshake {d!r:.200}")
        if peer.qpn >= 1 << 24 or peer.psn >= 1 << 24 or peer.rkey >= 1 << 32:
            raise ProtocolError(f"bad rdma handshake {d!r:.200}")
        if peer.nbytes < nbytes:
            raise ProtocolError(f"rdma peer region of {peer.nbytes} bytes, {nbytes} needed")
        return peer


def fabric_mismatch(a: PortInfo, b: PortInfo) -> str | None:
    """Why two ports cannot reach each other, if the descriptors alone say so."""
    if a.link_layer != b.link_layer:
        return f"{a.link_layer} here, {b.link_layer} at the peer"
    if a.link_layer == "InfiniBand" and a.subnet != b.subnet:
        return f"InfiniBand subnets differ ({a.subnet} vs {b.subnet})"
    return None


def decide_commit(option: str, in_order: bool | None, how: str) -> tuple[str, str]:
    """``("trailer" | "imm", why)`` from the ``commit`` option and what the queue pair said."""
    if option == "imm":
        return "imm", "commit=imm"
    if option == "trailer":
        if in_order is False:
            log.warning("rdma: commit=trailer although %s says RDMA WRITE data may land out of order", how)
        return "trailer", "commit=trailer"
    if in_order:
        return "trailer", f"{how}: data lands in order, consumers poll trailers"
    if in_order is None:
        return "imm", f"{how}; records committed with WRITE_WITH_IMM"
    return "imm", f"{how}: data may land out of order; records committed with WRITE_WITH_IMM"


def _open_port(v: Verbs, device: str | None, port: int, gid_index: int | None):
    """(Context, PortInfo) of the requested port, or of the first device whose ``port`` is ACTIVE."""
    e = v.enums
    try:
        names = [d.name.decode() if isinstance(d.name, bytes) else str(d.name) for d in v.device.get_device_list()]
    except v.error as exc:
        raise TransportUnavailable(f"rdma transport found no RDMA device: ibv_get_device_list() failed ({exc}); "
                                   f"{FIX_DEVICE}") from exc
    if not names:
        raise TransportUnavailable(f"rdma transport found no RDMA device (ibv_get_device_list() is empty); "
                                   f"{FIX_DEVICE}")
    if device is not None and device not in names:
        raise TransportUnavailable(f"RDMA device {device!r} not found; devices here: {', '.join(names)}")
    states = {int(getattr(e, f"IBV_PORT_{s}")): s for s in ("DOWN", "INIT", "ARMED", "ACTIVE", "ACTIVE_DEFER")
              if hasattr(e, f"IBV_PORT_{s}")}
    tried = []
    for name in [device] if device else names:
        try:
            ctx = v.device.Context(name=name)
        except v.error as exc:
            tried.append(f"{name}: cannot open ({exc}; is /dev/infiniband/uverbs* accessible?)")
            continue
        try:
            attr = ctx.query_port(port)
            if attr.state != e.IBV_PORT_ACTIVE:
                tried.append(f"{name} port {port} is {states.get(int(attr.state), attr.state)}")
            else:
                return ctx, _port_info(v, ctx, name, port, attr, gid_index)
        except v.error as exc:
            tried.append(f"{name} port {port}: {exc}")
        ctx.close()
    raise TransportUnavailable(f"no ACTIVE RDMA port ({'; '.join(tried)}); check the link and `ibv_devinfo` "
                               f"(state PORT_ACTIVE), or pick another with the device/port options")


def _gid_type(v: Verbs, ctx, port: int, index: int, infiniband: bool) -> str:
    if infiniband:
        return "IB"
    e, query = v.enums, getattr(ctx, "query_gid_type", None)
    if query is None:
        return "RoCE"
    v2 = getattr(e, "IBV_GID_TYPE_SYSFS_ROCE_V2", getattr(e, "IBV_GID_TYPE_ROCE_V2", None))
    try:
        return "RoCEv2" if query(port, index) == v2 else "RoCEv1"
    except v.error:
        return "RoCE"


def _port_info(v: Verbs, ctx, name: str, port: int, attr, gid_index: int | None) -> PortInfo:
    infiniband = attr.link_layer != v.enums.IBV_LINK_LAYER_ETHERNET
    index = gid_index
    if index is None:
        index = 0
        if not infiniband:
            # RoCE: prefer a v2 GID mapped from an IPv4 address (routable, what most fabrics are set up for).
            for i in range(attr.gid_tbl_len):
                try:
                    gid = str(ctx.query_gid(port, i).gid)
                except v.error:
                    continue
                if gid.startswith("0000:0000:0000:0000:0000:ffff:") and _gid_type(v, ctx, port, i, False) == "RoCEv2":
                    index = i
                    break
    try:
        gid = str(ctx.query_gid(port, index).gid)
    except v.error as exc:
        raise TransportUnavailable(f"{name} port {port} has no GID {index} ({exc}); set gid_index") from exc
    return PortInfo(device=name, port=port, link_layer="InfiniBand" if infiniband else "Ethernet",
                    lid=int(attr.lid), gid=gid, gid_index=index,
                    gid_type=_gid_type(v, ctx, port, index, infiniband), mtu=int(attr.active_mtu))


def unavailable_reason(device: str | None = None, port: int = 1) -> str | None:
    """Why the rdma transport cannot open here, or None when it can (for skips and operators)."""
    try:
        v = load_pyverbs()
        ctx, _ = _open_port(v, device, port, None)
    except TransportUnavailable as exc:
        return str(exc)
    ctx.close()
    return None


# -- memory -------------------------------------------------------------------

class _Memory:
    """Anonymous shared memory we own, so tensors viewing it outlive its registration."""

    def __init__(self, nbytes: int):
        # MAP_SHARED: a fork() does not make the pinned pages copy-on-write.
        self.map = mmap.mmap(-1, nbytes)
        probe = ctypes.c_char.from_buffer(self.map)
        self.address = ctypes.addressof(probe)
        del probe  # ends the buffer export, so the map can be closed later
        self.view = memoryview(self.map)

    def close(self) -> None:
        try:
            self.view.release()
            self.map.close()
        except BufferError:
            pass  # a tensor still views it; it is unmapped when that goes


class _Staging:
    """A byte ring of spans taken in order and freed in order (an RC queue pair completes in order)."""

    def __init__(self, size: int):
        self.size, self.head, self.tail = size, 0, 0

    def _start(self, n: int) -> int:
        pos = self.head % self.size
        return self.head + (self.size - pos if pos + n > self.size else 0)

    def fits(self, n: int) -> bool:
        return self._start(n) + n - self.tail <= self.size

    def take(self, n: int) -> int | None:
        """Offset of ``n`` free contiguous bytes, or None while in-flight spans hold them."""
        if not self.fits(n):
            return None
        start = self._start(n)
        self.head = start + n
        return start % self.size


def _register(v: Verbs, pd, memory: _Memory, nbytes: int, remote: bool):
    """A memory region of ``memory`` (``LOCAL_WRITE``, and ``REMOTE_WRITE`` if ``remote``); a
    TransportError that says how to raise the locked-memory limit if the device refuses it."""
    e = v.enums
    access = e.IBV_ACCESS_LOCAL_WRITE | (e.IBV_ACCESS_REMOTE_WRITE if remote else 0)
    try:
        return v.mr.MR(pd, nbytes, access, address=memory.address)
    except v.error as exc:
        raise TransportError(f"rdma: cannot register {nbytes} bytes ({exc}); {FIX_MEMLOCK}") from exc


def _size(part) -> int:
    return part.nbytes if isinstance(part, memoryview) else len(part)


def _nbytes(parts) -> int:
    return sum(_size(p) for p in parts)


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def _channel_fd(channel, before: set[int]) -> int | None:
    """The fd of a completion channel just created.

    pyverbs (up to 59 at least) does not expose ``channel->fd``, so unless it
    does, find it: the kernel names it ``anon_inode:[infinibandevent]``, and
    channels are only created on the event-loop thread, so exactly one new
    one is ours.
    """
    if isinstance(fd := getattr(channel, "fd", None), int):
        return fd
    new = []
    for fd in _open_fds() - before:
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[infinibandevent]":
                new.append(fd)
        except OSError:
            continue
    return new[0] if len(new) == 1 else None


# -- one side of one connection ------------------------------------------------

class _Link(Region, Writer):
    """One side of a directed connection: its queue pair, our region, our staging.

    Producer: ``view`` is the credit region; writes go to the consumer's data
    region. Consumer: ``view`` is the data region; writes go to the producer's
    credit region.
    """

    def __init__(self, endpoint: RdmaTransport, producer: bool, nbytes: int):
        v, e = endpoint._verbs, endpoint._verbs.enums
        self._endpoint, self._v, self._e = endpoint, v, e
        self.producer = producer
        self.role = "producer" if producer else "consumer"
        self.closed = False
        self.failed: TransportError | None = None
        self.commit = "trailer"
        self.bell = None  # the side channel's ring(), for the producer's late doorbell
        self.peer = "?"
        self._loop = asyncio.get_running_loop()
        self._flag = SLEEPING_OFFSET if producer else WAITING_OFFSET  # in our region: the peer will be belled
        self._own_flag = WAITING_OFFSET if producer else SLEEPING_OFFSET  # in the peer's region: ring us
        self._objs: list = []
        self._fd = self._timer = None
        self._events = 0
        self._staging = self._staging_mem = self._staging_mr = None
        self._pending: collections.deque[tuple[int, int]] = collections.deque()  # (wr_id, staging head)
        self._waiters: list[tuple[int, asyncio.Future]] = []
        self._next_id = 1
        self._last_signaled = 0
        self._ring_after = 0
        self._memory = _Memory(nbytes)
        self.view = self._memory.view
        self.psn = random.getrandbits(24)
        self._recv_mem = None if producer else _Memory(GRANULE)  # receives for WRITE_WITH_IMM land nothing here
        recv_depth = 1 if producer else RECV_DEPTH
        try:
            self._mr = self._register(self._memory, nbytes, remote=True)
            if self._recv_mem is not None:
                self._recv_mr = self._register(self._recv_mem, GRANULE)
            before = _open_fds()
            self._channel = self._keep(v.cq.CompChannel(endpoint._ctx))
            self._fd = _channel_fd(self._channel, before)
            self._cq = self._keep(v.cq.CQ(endpoint._ctx, endpoint._sq_depth + recv_depth + 1, None, self._channel, 0))
            cap = v.qp.QPCap(max_send_wr=endpoint._sq_depth, max_recv_wr=recv_depth, max_send_sge=1, max_recv_sge=1)
            init = v.qp.QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self._cq, rcq=self._cq, cap=cap, sq_sig_all=0)
            self._qp = self._keep(v.qp.QP(endpoint._pd, init))
            self.qpn = int(self._qp.qp_num)
            self._watch()
        except v.error as exc:
            self.close()
            raise TransportError(f"rdma: cannot set up a queue pair on {endpoint._local.device}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def _keep(self, obj):
        self._objs.append(obj)
        return obj

    def _register(self, memory: _Memory, nbytes: int, remote: bool = False):
        return self._keep(_register(self._v, self._endpoint._pd, memory, nbytes, remote))

    @property
    def address(self) -> int:
        return self._memory.address

    @property
    def rkey(self) -> int:
        return int(self._mr.rkey)

    def offer(self) -> dict:
        """What the peer needs to reach our region and queue pair."""
        return PeerQP(self._endpoint._local, self.qpn, self.psn, self.address, self.rkey, len(self.view)).as_dict()

    # -- bring-up --------------------------------------------------------------
    def connect(self, peer: PeerQP, staging_bytes: int, max_write: int) -> None:
        """Register the staging, post receives, and take the queue pair to RTS towards ``peer``."""
        v, e, port = self._v, self._e, self._endpoint._local
        self._peer_addr, self._peer_rkey, self._max_write = peer.addr, peer.rkey, max_write
        try:
            self._staging_mem = _Memory(staging_bytes)
            self._staging_mr = self._register(self._staging_mem, staging_bytes)
            self._staging = _Staging(staging_bytes)
            attr = v.qp.QPAttr(port_num=port.port)
            attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
            attr.pkey_index = 0
            self._qp.to_init(attr)
            if not self.producer:
                for _ in range(RECV_DEPTH):
                    self._post_recv()
            attr.path_mtu = min(port.mtu, peer.port.mtu)
            attr.dest_qp_num, attr.rq_psn, attr.sq_psn = peer.qpn, peer.psn, self.psn
            attr.max_dest_rd_atomic = attr.max_rd_atomic = 1
            attr.min_rnr_timer, attr.timeout, attr.retry_cnt, attr.rnr_retry = 12, 14, 7, 7
            grh = port.link_layer == "Ethernet" or port.subnet != peer.port.subnet
            route = v.addr.GlobalRoute(dgid=v.addr.GID(peer.port.gid), sgid_index=port.gid_index,
                                       hop_limit=64) if grh else None
            attr.ah_attr = v.addr.AHAttr(dlid=peer.port.lid, is_global=int(grh), port_num=port.port, gr=route)
            self._qp.to_rts(attr)
        except v.error as exc:
            raise TransportError(f"rdma: cannot connect queue pair {self.qpn} to {peer.port.device} "
                                 f"qp {peer.qpn}: {exc}") from exc

    def data_in_order(self) -> tuple[bool | None, str]:
        """Whether RDMA WRITE data into this queue pair is placed in order (ask after RTS)."""
        query = getattr(self._qp, "query_data_in_order", None)
        if query is None:
            return None, ("pyverbs cannot ask (no QP.query_data_in_order; rdma-core's C API is "
                          "ibv_query_qp_data_in_order())")
        try:
            return bool(query(self._e.IBV_WR_RDMA_WRITE, 0)), "ibv_query_qp_data_in_order"
        except Exception as exc:  # whatever went wrong, the answer is "cannot tell"
            return None, f"ibv_query_qp_data_in_order failed ({exc})"

    # -- completions -----------------------------------------------------------
    def _watch(self) -> None:
        if self._fd is not None:
            os.set_blocking(self._fd, False)
            self._loop.add_reader(self._fd, self._on_event)
        else:
            log.warning("rdma: cannot find the completion channel's fd; polling completions every %g ms",
                        POLL_FALLBACK_S * 1e3)
            self._timer = self._loop.call_later(POLL_FALLBACK_S, self._tick)
        self._cq.req_notify()

    def _on_event(self) -> None:
        try:
            self._channel.get_cq_event(self._cq)
        except self._v.error:
            return  # nothing there (the fd is non-blocking)
        self._events += 1
        if self._events >= 64:
            self._cq.ack_events(self._events)
            self._events = 0
        try:
            self._cq.req_notify()
            self._drain()
        except self._v.error as exc:
            self._fail(PeerGone(f"rdma {self.role} link to {self.peer}: {exc}"), exc)

    def _tick(self) -> None:
        self._drain()
        if not self.closed:
            self._timer = self._loop.call_later(POLL_FALLBACK_S, self._tick)

    def _drain(self) -> None:
        try:
            while self._reap():
                pass
        except TransportError as exc:
            self._fail(exc)

    def _reap(self) -> int:
        """Handle the completions waiting in the CQ; how many there were."""
        if self.closed:
            return 0
        try:
            n, wcs = self._cq.poll(32)
        except self._v.error as exc:
            raise PeerGone(f"rdma {self.role} link to {self.peer}: polling the CQ failed: {exc}") from exc
        for wc in wcs:
            if wc.status != self._e.IBV_WC_SUCCESS:
                what = getattr(self._v.cq, "cqe_status_to_str", str)(wc.status)
                raise PeerGone(f"rdma {self.role} link to {self.peer}: work request failed: {what} "
                               f"(status {int(wc.status)}, vendor error {wc.vendor_err})")
            if wc.opcode == self._e.IBV_WC_RECV_RDMA_WITH_IMM:
                self._commit_record(wc.imm_data)
                self._post_recv()
            else:
                self._retire(wc.wr_id)
        return n

    def _retire(self, wr_id: int) -> None:
        """Work requests up to ``wr_id`` are done: free their staging, wake who waits for them."""
        while self._pending and self._pending[0][0] <= wr_id:
            self._staging.tail = self._pending.popleft()[1]
        if self._waiters:
            for item in [w for w in self._waiters if w[0] <= wr_id]:
                self._waiters.remove(item)
                if not item[1].done():
                    item[1].set_result(None)
        if self._ring_after and self._ring_after <= wr_id:
            self._ring_after = 0
            if self.bell is not None:
                self.bell()

    def _commit_record(self, imm: int) -> None:
        """WRITE_WITH_IMM path: every byte of the record at ``imm * 64`` has landed; publish its trailer."""
        off = socket.ntohl(imm) * GRANULE
        if not CONTROL_BYTES <= off <= len(self.view) - HEADER_BYTES:
            raise ProtocolError(f"rdma peer {self.peer} committed a record at offset {off}")
        magic, kind, _flags, seq, length, _aux = HEADER.unpack_from(self.view, off)
        end = off + record_bytes(length)
        if magic != MAGIC or kind == PAD or end > len(self.view):
            raise ProtocolError(f"rdma peer {self.peer} committed no record at offset {off}")
        U64.pack_into(self.view, end - 8, seq ^ TRAILER_KEY)
        self._endpoint._bell.set()

    def _post_recv(self) -> None:
        wr = self._v.wr
        sge = wr.SGE(self._recv_mem.address, GRANULE, self._recv_mr.lkey)
        rwr = wr.RecvWR(wr_id=0, num_sge=1, sg=[sge])
        try:
            self._qp.post_recv(rwr)
        except self._v.error as exc:
            raise PeerGone(f"rdma consumer link to {self.peer}: cannot post a receive: {exc}") from exc
        finally:
            if self._v.free_wrs:
                rwr.close()
                sge.close()

    # -- writes ----------------------------------------------------------------
    def write(self, offset: int, parts) -> None:
        try:
            self._write(offset, parts)
        except TransportError as exc:
            self._fail(exc)
            if self.producer:
                raise
            # A consumer writes credit from release callbacks; recv() learns of the failure through _fail.

    def reach(self, handle: bytes, size: int) -> _RemoteRegion:
        try:
            address, rkey = REGION_HANDLE.unpack(handle)
        except struct.error as exc:
            raise ProtocolError(f"rdma: bad granted-region handle of {len(handle)} bytes") from exc
        return _RemoteRegion(self, address, rkey, size)

    def write_region(self, address: int, rkey: int, offset: int, parts, n: int) -> None:
        """RDMA WRITE ``parts`` (``n`` bytes) into a granted region at ``offset``, in spans the staging can take."""
        step = self._max_write
        end = offset + n
        views = [memoryview(p).cast("B") for p in parts]
        for start in range(offset, end, step):
            span = tuple(slice_parts(views, start - offset, min(start + step, end) - offset))
            try:
                self._write(start, span, dest=(address, rkey))
            except TransportError as exc:
                self._fail(exc)
                raise

    def _write(self, offset: int, parts, signal: bool = False, dest: tuple[int, int] | None = None) -> int:
        if self.failed is not None:
            raise self.failed
        if self.closed:
            raise PeerGone(f"rdma {self.role} link to {self.peer} is closed")
        n = _nbytes(parts)
        span = self._take(n)
        view, pos = self._staging_mem.view, span
        for part in parts:
            k = _size(part)
            view[pos : pos + k] = part
            pos += k
        imm = None
        if dest is not None:  # a granted region: raw bytes, gated by the PUT record that follows
            return self._post(span, n, offset, None, signal, dest)
        if self.commit == "imm" and self._is_record(offset, parts):
            view[span + n - 8 : span + n] = ZERO8  # the consumer writes the commit word on the completion
            imm = socket.htonl(offset // GRANULE)
        peer_sleeps = self.view[self._flag : self._flag + 8] != ZERO8
        # Our own "ring my doorbell" flag must be visible before we go on to look at the ring
        # and sleep (the Dekker handshake of ringtransport), so wait for that 8-byte write.
        own_flag = offset == self._own_flag and n == 8
        wr_id = self._post(span, n, offset, imm, signal or peer_sleeps or own_flag)
        if own_flag:
            self._wait(wr_id)
        elif peer_sleeps and imm is None:
            if self.producer:
                self._ring_after = wr_id  # ring again once the bytes have landed
            else:
                self._wait(wr_id)  # 16 bytes: cheaper than a late doorbell
        return wr_id

    @staticmethod
    def _is_record(offset: int, parts) -> bool:
        """A record with a payload (not a PAD half, not a flag word): the ones the consumer must gate."""
        if offset < CONTROL_BYTES or len(parts) < 2 or len(parts[0]) != HEADER_BYTES:
            return False
        magic, kind = HEADER.unpack_from(parts[0], 0)[:2]
        return magic == MAGIC and kind != PAD

    def _take(self, n: int) -> int:
        """A staging span for ``n`` bytes and a send-queue slot, polling completions while there are none."""
        deadline = None
        while True:
            if len(self._pending) < self._endpoint._sq_depth and (span := self._staging.take(n)) is not None:
                return span
            if not self._reap():
                deadline = deadline or time.monotonic() + self._endpoint.completion_timeout
                if time.monotonic() > deadline:
                    raise TransportTimeout(f"rdma {self.role} link to {self.peer}: no completion for "
                                           f"{self._endpoint.completion_timeout} s")

    def _wait(self, wr_id: int) -> None:
        deadline = time.monotonic() + self._endpoint.completion_timeout
        while self._pending and self._pending[0][0] <= wr_id:
            if not self._reap() and time.monotonic() > deadline:
                raise TransportTimeout(f"rdma {self.role} link to {self.peer}: write not completed in time")

    def _post(self, span: int, n: int, offset: int, imm: int | None, signal: bool,
              dest: tuple[int, int] | None = None) -> int:
        v, e = self._v, self._e
        wr_id, self._next_id = self._next_id, self._next_id + 1
        signal = (signal or wr_id - self._last_signaled >= SIGNAL_EVERY
                  or len(self._pending) + 1 >= self._endpoint._sq_depth or not self._staging.fits(self._max_write))
        sge = v.wr.SGE(self._staging_mem.address + span, n, self._staging_mr.lkey)
        swr = v.wr.SendWR(wr_id=wr_id, num_sge=1, sg=[sge],
                          opcode=e.IBV_WR_RDMA_WRITE if imm is None else e.IBV_WR_RDMA_WRITE_WITH_IMM,
                          send_flags=e.IBV_SEND_SIGNALED if signal else 0, imm_data=imm or 0)
        if dest is None:
            swr.set_wr_rdma(self._peer_rkey, self._peer_addr + offset)
        else:
            swr.set_wr_rdma(dest[1], dest[0] + offset)
        try:
            self._qp.post_send(swr)
        except v.error as exc:
            raise PeerGone(f"rdma {self.role} link to {self.peer}: post_send failed "
                           f"(queue pair in error state?): {exc}") from exc
        finally:
            if v.free_wrs:
                swr.close()
                sge.close()
        self._pending.append((wr_id, self._staging.head))
        if signal:
            self._last_signaled = wr_id
        return wr_id

    async def flush(self, timeout: float, probe: bool = False) -> None:
        """Wait until every write posted so far has completed (so has landed at the peer).

        A signalled 8-byte RDMA WRITE to an unused control word is added when
        the last write was not signalled, or always with ``probe``: then it
        proves the path works. Producer side only.
        """
        if self.failed is not None:
            raise self.failed
        if probe or (self._pending and self._last_signaled < self._pending[-1][0]):
            wr_id = self._write(FLUSH_OFFSET, (ZERO8,), signal=True)
        elif self._pending:
            wr_id = self._pending[-1][0]
        else:
            return
        fut = self._loop.create_future()
        self._waiters.append((wr_id, fut))
        # A completion later than completion_timeout is a failure, whatever the caller allows.
        async with asyncio.timeout(min(timeout, self._endpoint.completion_timeout)):
            await fut

    # -- failure and teardown ----------------------------------------------------
    def _fail(self, exc: TransportError, cause: BaseException | None = None) -> None:
        if cause is not None:
            exc.__cause__ = cause
        if self.failed is not None or self.closed:
            return
        self.failed = exc
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(exc)
        self._waiters.clear()
        self._endpoint._link_failed(self, exc)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._endpoint._offers.pop(getattr(self, "qpn", None), None)
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
        if self._timer is not None:
            self._timer.cancel()
        for _, fut in self._waiters:
            fut.cancel()
        try:
            if self._events:
                self._cq.ack_events(self._events)  # ibv_destroy_cq waits for every event to be acked
            for obj in reversed(self._objs):  # QP, MRs, CQ, channel: dependents first
                obj.close()
        except self._v.error as exc:
            log.warning("rdma: closing the %s link to %s: %s", self.role, self.peer, exc)
        for memory in (self._staging_mem, self._recv_mem, self._memory):
            if memory is not None:
                memory.close()


class _RemoteRegion(Writer):
    """A producer's way into a region the consumer granted: RDMA WRITEs through the connection's link."""

    def __init__(self, link: _Link, address: int, rkey: int, size: int):
        self._link, self._address, self._rkey, self.size = link, address, rkey, size

    def write(self, offset: int, parts) -> None:
        n = _nbytes(parts)
        if offset < 0 or offset + n > self.size:
            raise ProtocolError(f"rdma: {n} bytes at {offset} overrun a granted region of {self.size}")
        self._link.write_region(self._address, self._rkey, offset, parts, n)

    def close(self) -> None:
        pass  # nothing of ours: the consumer deregisters its region


class _GrantedMemory(GrantRegion):
    """A consumer's region for rendezvous: its own memory, registered for remote writes."""

    def __init__(self, endpoint: RdmaTransport, size: int):
        self._verbs = endpoint._verbs
        self._memory = _Memory(size)
        self.view = self._memory.view
        try:
            self._mr = _register(self._verbs, endpoint._pd, self._memory, size, remote=True)
        except TransportError:
            self._memory.close()
            raise
        self.handle = REGION_HANDLE.pack(self._memory.address, int(self._mr.rkey))

    def close(self) -> None:
        try:
            self._mr.close()
        except self._verbs.error as exc:
            log.warning("rdma: deregistering a granted region: %s", exc)
        self._memory.close()


# -- the transport ------------------------------------------------------------

class RdmaTransport(RingTransport):
    """The double-ring transport over RDMA: RC queue pairs and one-sided RDMA WRITE."""

    grants = True

    name = "rdma"

    @classmethod
    async def open(cls, *, host: str = "127.0.0.1", advertise_host: str | None = None,
                   ring_bytes: int | None = None, hwm_bytes: int | None = None, chunk_bytes: int | None = None,
                   send_timeout: float = 30.0, handshake_timeout: float = 10.0, spin_s: float = 100e-6,
                   spin: str = "auto", grant_bytes: int = GRANT_BYTES, grant_min_bytes: int = GRANT_MIN_BYTES,
                   grant_pool: GrantPool | None = None,
                   max_message_bytes: int = 2 << 30, device: str | None = None, port: int = 1,
                   gid_index: int | None = None, commit: str = "auto", staging_bytes: int | None = None,
                   fabric: str | None = None, completion_timeout: float = 10.0) -> RdmaTransport:
        """Open an endpoint on an RDMA port; its side channel listens on ``host`` (TCP).

        ``device`` (default: the first with ``port`` ACTIVE), ``port`` and
        ``gid_index`` (default: a RoCEv2 IPv4-mapped GID, else 0) pick the
        port. ``commit`` is "auto" (ask the queue pair), "trailer" or "imm".
        ``staging_bytes`` (default: twice the peer's largest record) is the
        registered source buffer per outbound connection. ``fabric`` is an
        optional label that ``auto`` compares between peers.
        """
        if commit not in COMMITS:
            raise ValueError(f"commit must be one of {', '.join(COMMITS)}")
        check_spin(spin)  # before the device is opened: nothing to close
        config = ring_config(ring_bytes, hwm_bytes, chunk_bytes)
        verbs = load_pyverbs()
        ctx, info = _open_port(verbs, device, port, gid_index)
        try:
            pd = verbs.pd.PD(ctx)
            sq_depth = max(8, min(SQ_DEPTH, ctx.query_device().max_qp_wr))
            _check_memlock(verbs, pd, max(config.data_region_bytes, staging_bytes or 2 * config.max_record))
        except verbs.error as exc:
            ctx.close()
            raise TransportUnavailable(f"cannot use RDMA device {info.device}: {exc}") from exc
        except BaseException:
            ctx.close()
            raise
        self = cls(host=host, advertise_host=advertise_host, config=config, send_timeout=send_timeout,
                   handshake_timeout=handshake_timeout, spin_s=spin_s, max_message_bytes=max_message_bytes,
                   spin=spin, grant_bytes=grant_bytes, grant_min_bytes=grant_min_bytes, grant_pool=grant_pool)
        self._verbs, self._ctx, self._pd, self._local, self._sq_depth = verbs, ctx, pd, info, sq_depth
        self._commit_option, self._staging_bytes, self._fabric = commit, staging_bytes, fabric
        self.completion_timeout = completion_timeout
        self._offers: dict[int, _Link] = {}
        self._commits = {"trailer": 0, "imm": 0}
        try:
            await self._start()
        except BaseException:
            ctx.close()
            raise
        log.info("rdma endpoint %s on %s port %d (%s, GID %d %s %s, MTU %d), pyverbs from %s", self.id[:8],
                 info.device, info.port, info.link_layer, info.gid_index, info.gid_type, info.gid,
                 128 << info.mtu, verbs.path)
        return self

    def _descriptor_extra(self) -> dict:
        return {"ring_bytes": self.config.size,
                "rdma": {**self._local.as_dict(), "commit": self._commit_option, "fabric": self._fabric}}

    def stats(self) -> dict[str, int]:
        return {**super().stats(), "rdma_commit_trailer": self._commits["trailer"],
                "rdma_commit_imm": self._commits["imm"]}

    # -- medium hooks ---------------------------------------------------------------
    def _make_region(self, size: int) -> _GrantedMemory:
        return _GrantedMemory(self, size)

    def _offer(self) -> tuple[Region, dict]:
        link = _Link(self, producer=True, nbytes=CREDIT_BYTES)
        self._offers[link.qpn] = link
        return link, {**link.offer(), "id": self.id}

    def _accept(self, offer: dict, config: RingConfig) -> tuple[Region, Writer, dict]:
        peer = PeerQP.from_dict(offer, CREDIT_BYTES)
        if why := fabric_mismatch(self._local, peer.port):
            raise TransportError(f"rdma peer {peer.port.device} cannot reach {self._local.device}: {why}")
        link = _Link(self, producer=False, nbytes=config.data_region_bytes)
        try:
            link.peer = f"{str(offer.get('id', '?'))[:8]} on {peer.port.device}"
            link.connect(peer, CONSUMER_STAGING, CREDIT_BYTES)
            link.commit, why = decide_commit(self._commit_option, *link.data_in_order())
        except BaseException:
            link.close()
            raise
        first = not any(self._commits.values())
        self._commits[link.commit] += 1
        log.log(logging.INFO if first else logging.DEBUG, "rdma %s: inbound qp %d from %s qp %d: commit=%s (%s)",
                self.id[:8], link.qpn, peer.port.device, peer.qpn, link.commit, why)
        return link, link, {**link.offer(), "commit": link.commit, "peer_qpn": peer.qpn}

    def _complete(self, answer: dict, config: RingConfig) -> Writer:
        peer = PeerQP.from_dict(answer, config.data_region_bytes)
        if answer.get("commit") not in ("trailer", "imm"):
            raise ProtocolError(f"rdma answer names no commit path: {answer.get('commit')!r}")
        link = self._offers.pop(answer.get("peer_qpn"), None)
        if link is None:
            raise ProtocolError(f"rdma answer for an unknown queue pair {answer.get('peer_qpn')!r}")
        link.peer, link.commit = peer.port.device, answer["commit"]  # connect() names the peer
        staging = max(config.max_record, self._staging_bytes or 2 * config.max_record)
        link.connect(peer, staging, config.max_record)
        return link

    # -- lifecycle --------------------------------------------------------------
    async def connect(self, descriptor: Mapping[str, Any], *, timeout: float | None = None,
                      credential: Credential | None = None):
        info = descriptor.get("rdma")
        if isinstance(info, Mapping) and (why := fabric_mismatch(self._local, PortInfo.from_dict(info))):
            raise TransportError(f"rdma peer {descriptor.get('id', '?')} is out of reach: {why}")
        sender = await super().connect(descriptor, timeout=timeout, credential=credential)
        link = sender._data  # the _Link that _complete() returned
        link.bell = sender._channel.ring
        link.peer = f"{str(descriptor.get('id', '?'))[:8]} on {link.peer}"
        timeout = self.handshake_timeout if timeout is None else timeout
        try:
            await link.flush(timeout, probe=True)
        except BaseException as exc:
            await sender.aclose()
            if isinstance(exc, TimeoutError) and not isinstance(exc, TransportError):
                raise TransportTimeout(f"rdma: the first RDMA WRITE to peer {descriptor.get('id', '?')} did not "
                                       f"complete within {timeout} s: no working path from {self._local.device}")
            raise
        return sender

    async def _poll_all(self):
        # A producer flushes before it closes, so the completions committing its last
        # records (WRITE_WITH_IMM path) are in our CQ before its side channel ends.
        for conn in self._inbound:
            if not conn.channel.alive:
                conn.data._drain()
        return await super()._poll_all()

    def _link_failed(self, link: _Link, exc: TransportError) -> None:
        """Wake whoever waits on ``link``: a verbs error is as final as a closed side channel."""
        # A consumer's credit writes fail whenever its producer closes first, before the side
        # channel has told it so: part of a normal goodbye, unlike a producer's failed write.
        alive = any(s._channel.alive for s in self._senders if s._data is link)
        log.log(logging.WARNING if alive else logging.DEBUG, "%s", exc)
        # A consumer whose credit can no longer reach its producer ends the connection at
        # once, so the producer gets PeerGone instead of waiting for credit until its timeout.
        self._medium_failed(link, exc)

    async def aclose(self) -> None:
        if self._closed:
            return
        await super().aclose()  # each sender flushes its posted writes before it closes
        for link in list(self._offers.values()):
            link.close()
        try:
            self._pd.close()
            self._ctx.close()
        except self._verbs.error as exc:
            log.warning("rdma: closing %s: %s", self._local.device, exc)


def _check_memlock(v: Verbs, pd, nbytes: int) -> None:
    """Register (and drop) the largest region a connection needs, so a low memlock limit shows at start-up."""
    memory = _Memory(nbytes)
    try:
        e = v.enums
        v.mr.MR(pd, nbytes, e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE, address=memory.address).close()
    except v.error as exc:
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft >> 10} KiB"
        raise TransportUnavailable(f"cannot register {nbytes >> 20} MiB with the RDMA device ({exc}); the "
                                   f"locked-memory limit is {limit}: {FIX_MEMLOCK}") from exc
    finally:
        memory.close()
