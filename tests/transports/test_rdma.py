"""The rdma transport: start-up errors, pyverbs discovery, handshake data, and
its queue-pair logic over a fake NIC; the contract suite where a port exists.

No RDMA hardware exists on the development machines (and no soft-RoCE: the
kernel has no RDMA support). So the tests split in three:

* what runs for real here: ``import transports.rdma`` without pyverbs, the
  discovery of Debian's python3-pyverbs from the virtualenv, and open()
  failing with a fix when there is no device;
* what uses *test doubles*, each saying so: fake import functions for the
  two enum layouts, a fake port description, and a fake NIC (a stand-in
  for pyverbs that performs RDMA WRITEs as deferred, optionally out-of-order
  memmoves between regions of this process) that drives the real
  queue-pair, staging, signalling and commit code;
* the transport contract over rdma (the tests of test_contract.py), which
  skips with the reason from ibv_get_device_list() when no port is ACTIVE.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import json
import logging
import os
import subprocess
import sys
import types

import msgpack
import numpy
import pytest
import torch

from transports import PeerGone, ProtocolError, Refused, TransportTimeout, TransportUnavailable, rdma
from transports.rdma import PeerQP, PortInfo, RdmaTransport, decide_commit, fabric_mismatch, resolve_enums

from . import conftest
from .test_credentials import GOOD, KEY, LIARS
from .peer import checksum, messages

pytestmark = pytest.mark.timeout(120)

ROOT = conftest.ROOT
RDMA_OPTIONS = {"ring_bytes": 16 << 20}


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


# -- real: import and discovery ------------------------------------------------

def test_import_works_without_pyverbs():
    proc = run_python(
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'pyverbs': raise ImportError('blocked by the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import transports.rdma, transports.auto\n"
        "from transports import transport_class\n"
        "assert transport_class('rdma').name == 'rdma'\n"
        "assert 'pyverbs' not in sys.modules\n"
        "print('ok')\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


@pytest.fixture
def no_cached_verbs(monkeypatch):
    monkeypatch.setattr(rdma, "_VERBS", None)


async def test_open_without_pyverbs_says_how_to_install(monkeypatch, tmp_path, no_cached_verbs):
    def missing(name):
        raise ImportError(f"No module named {name!r} (simulated by the test)")

    monkeypatch.setattr(rdma, "_import", missing)
    monkeypatch.setattr(rdma, "SYSTEM_SITE_DIRS", (str(tmp_path),))
    with pytest.raises(TransportUnavailable) as info:
        await RdmaTransport.open()
    message = str(info.value)
    assert "pyverbs" in message and "python3-pyverbs" in message and "rdma-core" in message
    assert "--transport" in message


async def test_open_with_pyverbs_for_another_python(monkeypatch, tmp_path, no_cached_verbs):
    # A directory shaped like python3-pyverbs built for the next minor version: a test double.
    package = tmp_path / "pyverbs"
    package.mkdir()
    (package / "__init__.py").write_text("")
    other = sys.version_info.minor + 1
    (package / f"device.cpython-3{other}-x86_64-linux-gnu.so").write_bytes(b"")

    def missing(name):
        raise ImportError(f"No module named {name!r} (simulated by the test)")

    monkeypatch.setattr(rdma, "_import", missing)
    monkeypatch.setattr(rdma, "SYSTEM_SITE_DIRS", (str(tmp_path),))
    with pytest.raises(TransportUnavailable) as info:
        await RdmaTransport.open()
    message = str(info.value)
    assert f"Python 3.{other}" in message and f"Python 3.{sys.version_info.minor}" in message
    assert "python3 -m venv" in message


def debian_pyverbs() -> str | None:
    dirs = rdma.system_pyverbs_dirs()
    return dirs[0] if dirs else None


@pytest.mark.skipif(debian_pyverbs() is None,
                    reason="the OS's python3-pyverbs is not installed (apt-get install python3-pyverbs)")
def test_system_pyverbs_imports_from_the_venv():
    proc = run_python(
        "import importlib.util, logging, sys\n"
        "from transports import rdma\n"
        "own = importlib.util.find_spec('pyverbs') is not None\n"
        "v = rdma.load_pyverbs()\n"
        "assert logging.getLogger().handlers == [], 'pyverbs reconfigured logging'\n"
        "assert hasattr(v.enums, 'IBV_WR_RDMA_WRITE_WITH_IMM')\n"
        "print(own, v.path, v.enums.__name__, hasattr(v.qp.QP, 'query_data_in_order'))\n")
    assert proc.returncode == 0, proc.stderr
    own, path, enums, in_order_query = proc.stdout.split()
    if own == "False":  # the virtualenv has no pyverbs of its own: the system's was found and loaded
        assert path == debian_pyverbs()
    assert enums in rdma.ENUM_MODULES
    assert in_order_query in ("True", "False")  # older pyverbs cannot ask: the transport then commits with imm


def pyverbs_state() -> tuple[bool, str | None]:
    """(pyverbs loads, why rdma cannot open) in this process."""
    try:
        rdma.load_pyverbs()
    except TransportUnavailable:
        return False, None
    return True, rdma.unavailable_reason()


async def test_open_without_device_says_how_to_fix():
    loads, reason = pyverbs_state()
    if not loads:
        pytest.skip("pyverbs is not installed, so the no-device path cannot be reached")
    if reason is None:
        pytest.skip("this machine has an ACTIVE RDMA port")
    with pytest.raises(TransportUnavailable) as info:
        await RdmaTransport.open()
    message = str(info.value)
    assert "ibv_devices" in message and "rdma link add rxe0 type rxe netdev" in message


# -- pure pieces, with test doubles --------------------------------------------

def fake_import(available: dict[str, object]):
    """A test double for the import helper: pyverbs' enum modules cannot be installed in both layouts here."""
    def import_module(name):
        if name not in available:
            raise ImportError(f"No module named {name!r}")
        return available[name]
    return import_module


NEW = types.SimpleNamespace(IBV_WR_RDMA_WRITE=0, layout="libibverbs_enums (rdma-core 59+)")
OLD = types.SimpleNamespace(IBV_WR_RDMA_WRITE=0, layout="enums (before 59)")


@pytest.mark.parametrize(("modules", "expected"), [
    ({"pyverbs.libibverbs_enums": NEW}, NEW),
    ({"pyverbs.enums": OLD}, OLD),
    ({"pyverbs.libibverbs_enums": NEW, "pyverbs.enums": OLD}, NEW),
    # v59 ships a .pxd-only libibverbs_enums next to a Python enums module in some builds:
    ({"pyverbs.libibverbs_enums": types.SimpleNamespace(), "pyverbs.enums": OLD}, OLD),
])
def test_both_enum_layouts_resolve(modules, expected):
    assert resolve_enums(fake_import(modules)) is expected


def test_no_enum_module_is_unavailable():
    with pytest.raises(TransportUnavailable, match="python3-pyverbs"):
        resolve_enums(fake_import({}))


def fake_port(**changes) -> PortInfo:
    """A test double for what a real device reports: no RDMA port exists on the development machines."""
    fields = dict(device="mlx5_0", port=1, link_layer="Ethernet", lid=0,
                  gid="0000:0000:0000:0000:0000:ffff:0a00:0005", gid_index=3, gid_type="RoCEv2", mtu=5)
    return PortInfo(**{**fields, **changes})


def test_descriptor_and_handshake_round_trip_through_msgpack():
    port = fake_port()
    endpoint = types.SimpleNamespace(config=rdma.RingConfig.for_size(1 << 20), _local=port,
                                     _commit_option="auto", _fabric="rack-a")
    extra = RdmaTransport._descriptor_extra(endpoint)
    descriptor = msgpack.unpackb(msgpack.packb({"transport": "rdma", "id": "x", **extra}))
    assert PortInfo.from_dict(descriptor["rdma"]) == port
    assert descriptor["rdma"]["commit"] == "auto" and descriptor["rdma"]["fabric"] == "rack-a"

    offer = PeerQP(port, qpn=0x1234, psn=0xABCDE, addr=0x7F00_0000_1000, rkey=0xDEADBEEF, nbytes=128)
    wire = msgpack.unpackb(msgpack.packb({**offer.as_dict(), "commit": "imm", "peer_qpn": 7}))
    assert PeerQP.from_dict(wire, 128) == offer


@pytest.mark.parametrize("bad", [
    {"qpn": 1},
    {"qpn": -1, "psn": 0, "addr": 0, "rkey": 0, "bytes": 128},
    {"qpn": 1 << 24, "psn": 0, "addr": 0, "rkey": 0, "bytes": 128},
    {"qpn": 1, "psn": 0, "addr": 0, "rkey": 0, "bytes": 64},
    {"qpn": "1", "psn": 0, "addr": 0, "rkey": 0, "bytes": 128},
])
def test_bad_handshake_is_a_protocol_error(bad):
    with pytest.raises(ProtocolError):
        PeerQP.from_dict({"port": fake_port().as_dict(), **bad}, 128)
    with pytest.raises(ProtocolError):
        PortInfo.from_dict({**fake_port().as_dict(), "mtu": 9})
    with pytest.raises(ProtocolError):
        PortInfo.from_dict({**fake_port().as_dict(), "gid": "10.0.0.5"})


def test_fabric_rules():
    assert fabric_mismatch(fake_port(), fake_port(gid_index=1)) is None
    assert "Ethernet" in fabric_mismatch(fake_port(), fake_port(link_layer="InfiniBand"))
    ib = fake_port(link_layer="InfiniBand", gid="fe80:0000:0000:0000:0002:c903:0001:0002", gid_type="IB", lid=4)
    assert fabric_mismatch(ib, ib) is None
    other_subnet = fake_port(link_layer="InfiniBand", gid="fe80:0000:0000:0001:0002:c903:0001:0003")
    assert "subnets" in fabric_mismatch(ib, other_subnet)


@pytest.mark.parametrize(("option", "in_order", "expected"), [
    ("auto", True, "trailer"),
    ("auto", False, "imm"),
    ("auto", None, "imm"),  # cannot ask: the safe path
    ("imm", True, "imm"),
    ("trailer", True, "trailer"),
])
def test_commit_decision(option, in_order, expected):
    assert decide_commit(option, in_order, "ibv_query_qp_data_in_order")[0] == expected


# -- a fake NIC: a test double for pyverbs and the hardware ----------------------

class FakeVerbsError(Exception):
    """Stands in for pyverbs.pyverbs_error.PyverbsError."""


E = types.SimpleNamespace(
    IBV_PORT_DOWN=1, IBV_PORT_INIT=2, IBV_PORT_ARMED=3, IBV_PORT_ACTIVE=4,
    IBV_LINK_LAYER_INFINIBAND=1, IBV_LINK_LAYER_ETHERNET=2, IBV_GID_TYPE_SYSFS_ROCE_V2=1,
    IBV_QPT_RC=2, IBV_ACCESS_LOCAL_WRITE=1, IBV_ACCESS_REMOTE_WRITE=2,
    IBV_WR_RDMA_WRITE=0, IBV_WR_RDMA_WRITE_WITH_IMM=1, IBV_SEND_SIGNALED=2,
    IBV_WC_SUCCESS=0, IBV_WC_WR_FLUSH_ERR=5, IBV_WC_REM_ACCESS_ERR=10,
    IBV_WC_RDMA_WRITE=1, IBV_WC_RECV_RDMA_WITH_IMM=129,
)
GIDS = ["fe80:0000:0000:0000:0000:00ff:fe00:0001", "0000:0000:0000:0000:0000:ffff:7f00:0001"]


class FakeNIC:
    """Performs RDMA WRITEs between regions of this process, later, as a NIC would.

    A posted write is queued; the event loop (or a CQ poll, since a real NIC
    progresses while the CPU polls) executes it: it reads the source span
    then, so a staging span reused too early shows up as corrupted data.
    With ``in_order=False`` the first and last 64 bytes of a write land
    first and the middle 20 turns of the event loop later, so a consumer
    that trusted the trailer would read torn records. ``fail_next`` makes the next write fail with
    REM_ACCESS_ERR, putting the queue pair in the error state, when
    ``fail_if(write)`` says so.
    """

    def __init__(self, in_order: bool = True):
        self.in_order = in_order
        self.fail_if = lambda write: False
        self.mrs: dict[int, tuple[int, int]] = {}
        self.qps: dict[int, FakeQP] = {}
        self.work: collections.deque = collections.deque()
        self.keys = iter(range(1, 1 << 30))
        self.writes = 0

    def progress(self) -> None:
        if self.work:
            step, later = self.work.popleft()
            if later:
                self.schedule(step, later - 1)
            else:
                step()

    def run_all(self) -> None:
        while self.work:
            self.work.popleft()[0]()

    def schedule(self, step, later: int = 0) -> None:
        """Run ``step`` after ``later`` more turns of the event loop (or at the next CQ poll)."""
        self.work.append((step, later))
        asyncio.get_running_loop().call_soon(self.progress)

    def covers(self, key: int, addr: int, length: int) -> bool:
        base, size = self.mrs.get(key, (0, -1))
        return base <= addr and addr + length <= base + size

    def verbs(self) -> rdma.Verbs:
        nic = self

        class Context:
            def __init__(self, name):
                self.name = name

            def query_port(self, port):
                return types.SimpleNamespace(state=E.IBV_PORT_ACTIVE, link_layer=E.IBV_LINK_LAYER_ETHERNET,
                                             lid=0, gid_tbl_len=len(GIDS), active_mtu=3)

            def query_gid(self, port, index):
                return types.SimpleNamespace(gid=GIDS[index])

            def query_gid_type(self, port, index):
                return 1 if index == 1 else 0

            def query_device(self):
                return types.SimpleNamespace(max_qp_wr=48)  # small: the send-queue-full path runs

            def close(self):
                pass

        class MR:
            def __init__(self, pd, length, access, address=None):
                self.lkey = self.rkey = next(nic.keys)
                nic.mrs[self.lkey] = (address, length)

            def close(self):
                nic.mrs.pop(self.lkey, None)

        class CompChannel:
            def __init__(self, ctx):
                self.fd, self.w = os.pipe()
                os.set_blocking(self.w, False)

            def get_cq_event(self, cq):
                try:
                    os.read(self.fd, 1)
                except BlockingIOError as exc:
                    raise FakeVerbsError("Failed to get CQ event") from exc

            def close(self):
                if self.w is not None:
                    os.close(self.fd)
                    os.close(self.w)
                    self.w = None

        class CQ:
            def __init__(self, ctx, cqe, cq_context, channel, vector):
                self.wcs, self.channel, self.armed = collections.deque(), channel, False

            def push(self, **wc):
                self.wcs.append(types.SimpleNamespace(**{"vendor_err": 0, "imm_data": 0, "wr_id": 0, "qp": None, **wc}))
                if self.armed and self.channel.w is not None:
                    self.armed = False
                    os.write(self.channel.w, b"!")

            def poll(self, n=1):
                nic.run_all()
                out = [self.wcs.popleft() for _ in range(min(n, len(self.wcs)))]
                for wc in out:
                    if wc.opcode == E.IBV_WC_RDMA_WRITE:
                        wc.qp.retire(wc.wr_id)
                return len(out), out

            def req_notify(self, solicited_only=False):
                self.armed = True

            def ack_events(self, n):
                pass

            def close(self):
                pass

        verbs = types.SimpleNamespace(
            device=types.SimpleNamespace(get_device_list=lambda: [types.SimpleNamespace(name=b"fake_rxe0")],
                                         Context=Context),
            pd=types.SimpleNamespace(PD=lambda ctx: types.SimpleNamespace(close=lambda: None)),
            mr=types.SimpleNamespace(MR=MR),
            cq=types.SimpleNamespace(CompChannel=CompChannel, CQ=CQ, cqe_status_to_str=lambda s: f"status {s}"),
            qp=types.SimpleNamespace(QP=lambda pd, init: FakeQP(nic, init),
                                     QPCap=types.SimpleNamespace, QPInitAttr=types.SimpleNamespace,
                                     QPAttr=types.SimpleNamespace),
            wr=types.SimpleNamespace(SGE=FakeSGE, SendWR=FakeSendWR, RecvWR=FakeSendWR),
            addr=types.SimpleNamespace(GID=str, GlobalRoute=types.SimpleNamespace, AHAttr=types.SimpleNamespace),
        )
        return rdma.Verbs(path="(fake NIC)", enums=E, error=FakeVerbsError, free_wrs=True, **vars(verbs))


class FakeSGE:
    def __init__(self, addr, length, lkey):
        self.addr, self.length, self.lkey = addr, length, lkey

    def close(self):
        pass


class FakeSendWR:
    def __init__(self, wr_id=0, opcode=0, num_sge=0, imm_data=0, sg=None, send_flags=2):
        self.wr_id, self.opcode, self.imm_data, self.sg, self.send_flags = wr_id, opcode, imm_data, sg, send_flags

    def set_wr_rdma(self, rkey, addr):
        self.rkey, self.raddr = rkey, addr

    def close(self):
        pass


class FakeQP:
    def __init__(self, nic: FakeNIC, init):
        self.nic, self.init = nic, init
        self.qp_num = 100 + len(nic.qps) + len(nic.mrs)
        while self.qp_num in nic.qps:
            self.qp_num += 1
        nic.qps[self.qp_num] = self
        self.qp_state, self.recvs, self.in_flight = "RESET", 0, collections.deque()

    def to_init(self, attr):
        self.qp_state = "INIT"

    def to_rts(self, attr):
        self.dest, self.qp_state = attr.dest_qp_num, "RTS"

    def query_data_in_order(self, op, flags=0):
        return int(self.nic.in_order)

    def post_recv(self, wr):
        assert self.qp_state != "RESET", "receives need INIT or later"
        self.recvs += 1

    def retire(self, wr_id):
        while self.in_flight and self.in_flight[0] <= wr_id:
            self.in_flight.popleft()

    def post_send(self, wr):
        if self.qp_state not in ("RTS", "ERR"):
            raise FakeVerbsError(f"Failed to post send (QP in {self.qp_state})")
        if len(self.in_flight) >= self.init.cap.max_send_wr:
            raise FakeVerbsError("Failed to post send: send queue full")
        self.in_flight.append(wr.wr_id)
        sge = wr.sg[0]
        w = types.SimpleNamespace(wr_id=wr.wr_id, opcode=wr.opcode, imm=wr.imm_data, rkey=wr.rkey,
                                  raddr=wr.raddr, addr=sge.addr, length=sge.length, lkey=sge.lkey,
                                  signaled=bool(wr.send_flags & E.IBV_SEND_SIGNALED))
        self.nic.schedule(lambda: self.execute(w))

    def execute(self, w):
        nic, peer = self.nic, self.nic.qps.get(getattr(self, "dest", None))
        if self.qp_state == "ERR":
            return self.init.scq.push(status=E.IBV_WC_WR_FLUSH_ERR, opcode=E.IBV_WC_RDMA_WRITE, wr_id=w.wr_id, qp=self)
        ok = (peer is not None and not nic.fail_if(w) and nic.covers(w.lkey, w.addr, w.length)
              and nic.covers(w.rkey, w.raddr, w.length))
        if not ok:
            self.qp_state = "ERR"
            return self.init.scq.push(status=E.IBV_WC_REM_ACCESS_ERR, opcode=E.IBV_WC_RDMA_WRITE, wr_id=w.wr_id,
                                      qp=self)
        nic.writes += 1
        if nic.in_order or w.length <= 128:
            ctypes.memmove(w.raddr, w.addr, w.length)
            return self.complete(w, peer)
        # Out of order: both ends (a record's header and trailer) land first, the middle later.
        ctypes.memmove(w.raddr, w.addr, 64)
        ctypes.memmove(w.raddr + w.length - 64, w.addr + w.length - 64, 64)

        def middle():
            if nic.covers(w.lkey, w.addr, w.length) and nic.covers(w.rkey, w.raddr, w.length):
                ctypes.memmove(w.raddr + 64, w.addr + 64, w.length - 128)  # unless deregistered meanwhile
                self.complete(w, peer)
        nic.schedule(middle, later=20)

    def complete(self, w, peer):
        if w.signaled:
            self.init.scq.push(status=E.IBV_WC_SUCCESS, opcode=E.IBV_WC_RDMA_WRITE, wr_id=w.wr_id, qp=self)
        if w.opcode == E.IBV_WR_RDMA_WRITE_WITH_IMM:
            assert peer.recvs > 0, "WRITE_WITH_IMM without a posted receive (the consumer must keep them posted)"
            peer.recvs -= 1
            peer.init.rcq.push(status=E.IBV_WC_SUCCESS, opcode=E.IBV_WC_RECV_RDMA_WITH_IMM, imm_data=w.imm)

    def close(self):
        self.nic.qps.pop(self.qp_num, None)


@pytest.fixture
def fake_nic(monkeypatch):
    """Factory: ``fake_nic(in_order=...)`` installs a FakeNIC as pyverbs for this test."""
    def install(in_order: bool = True) -> FakeNIC:
        nic = FakeNIC(in_order)
        monkeypatch.setattr(rdma, "_VERBS", nic.verbs())
        return nic
    return install


@pytest.fixture
async def rdma_pair(fake_nic):
    """Factory: two rdma endpoints in this process on one fake NIC, closed at teardown."""
    opened = []

    async def open_(in_order=True, **options):
        nic = fake_nic(in_order)
        ends = [await RdmaTransport.open(ring_bytes=1 << 20, **options) for _ in range(2)]
        opened.extend(ends)
        return nic, ends

    yield open_
    for end in opened:
        await end.aclose()


SIZES = [0, 1, 4096, 100_000, 700_000, 3 << 20, 64, [250_000, "float32"]]  # 3 MiB streams through a 1 MiB ring


async def exchange(a: RdmaTransport, b: RdmaTransport, count: int, seed: int) -> None:
    spec = {"count": count, "sizes": SIZES, "seed": seed, "name": f"s{seed}"}
    expected = [checksum(tensors) for _, tensors in messages(spec)]

    async def receive():
        got = []
        for _ in range(count):
            with await b.recv(timeout=30) as msg:
                got.append((msg.header["seq"], checksum(msg.tensors)))
        return got

    receiving = asyncio.create_task(receive())
    try:
        async with await a.connect(b.descriptor, timeout=10) as sender:
            for header, tensors in messages(spec):
                await sender.send(header, tensors, timeout=30)
        assert await receiving == list(enumerate(expected))
    finally:
        receiving.cancel()


@pytest.mark.parametrize(("in_order", "commit", "path"), [
    (True, "auto", "trailer"),
    (False, "auto", "imm"),
    (True, "imm", "imm"),
])
async def test_fake_nic_messages_both_ways(rdma_pair, in_order, commit, path):
    nic, (a, b) = await rdma_pair(in_order=in_order, commit=commit)
    await asyncio.gather(exchange(a, b, 24, 1), exchange(b, a, 24, 2))
    assert a.stats()["messages_received"] == b.stats()["messages_received"] == 24
    assert a.stats()[f"rdma_commit_{path}"] == b.stats()[f"rdma_commit_{path}"] == 1
    assert nic.writes > 100


async def test_fake_nic_out_of_order_breaks_trailer_polling(rdma_pair, caplog):
    """Why the decision matters, and proof that the fake NIC can tear records: forcing
    commit=trailer on a NIC that places data out of order corrupts what the consumer reads
    (a consumer that always spins reads while the NIC is still placing a record)."""
    _, (a, b) = await rdma_pair(in_order=False, commit="trailer", spin="always")
    spec = {"count": 24, "sizes": SIZES, "seed": 1}
    sender = await a.connect(b.descriptor, timeout=10)
    assert "may land out of order" in caplog.text

    async def send():
        for header, tensors in messages(spec):
            await sender.send(header, tensors, timeout=10)

    sending = asyncio.create_task(send())
    torn = False
    try:
        for _, tensors in messages(spec):
            with await b.recv(timeout=10) as msg:
                if checksum(msg.tensors) != checksum(tensors):
                    torn = True
                    break
    except ProtocolError:
        torn = True
    sending.cancel()
    await asyncio.gather(sending, return_exceptions=True)
    await sender.aclose()
    assert torn


async def test_fake_nic_failed_record_write_is_peer_gone(rdma_pair, caplog):
    nic, (a, b) = await rdma_pair()
    sender = await a.connect(b.descriptor, timeout=10)
    await sender.send({"seq": 0}, {"x": torch.ones(1000)})
    with await b.recv(timeout=10) as msg:
        assert msg.header == {"seq": 0}
    nic.fail_if = lambda write: write.length > 1000  # the producer's next record
    with caplog.at_level(logging.WARNING), pytest.raises(PeerGone, match="work request failed: status 10"):
        for i in range(1, 50):
            await sender.send({"seq": i}, {"x": torch.ones(1000)}, timeout=5)
            await asyncio.sleep(0.01)
    assert "rdma producer link" in caplog.text
    await sender.aclose()


async def test_fake_nic_failed_credit_write_drops_the_connection(rdma_pair, caplog):
    nic, (a, b) = await rdma_pair()
    sender = await a.connect(b.descriptor, timeout=10)
    nic.fail_if = lambda write: write.length == 16  # the consumer's credit word
    with caplog.at_level(logging.DEBUG, logger="transports.rdma"), pytest.raises(PeerGone):
        for i in range(50):
            await sender.send({"seq": i}, {"x": torch.ones(1000)}, timeout=5)
            try:
                (await b.recv(timeout=0.2)).release()
            except TransportTimeout:
                pass
            await asyncio.sleep(0.01)  # both calls can complete without yielding to the event loop
    assert "rdma consumer link" in caplog.text
    await sender.aclose()


async def test_fake_nic_releases_everything(rdma_pair):
    nic, (a, b) = await rdma_pair()
    await exchange(a, b, 8, 3)
    await a.aclose()
    await b.aclose()
    assert nic.mrs == {} and nic.qps == {}


async def test_fake_nic_descriptor(rdma_pair):
    _, (a, _) = await rdma_pair()
    d = msgpack.unpackb(msgpack.packb(a.descriptor))
    assert d["transport"] == "rdma" and d["rdma"]["device"] == "fake_rxe0"
    assert d["rdma"]["gid_index"] == 1 and d["rdma"]["gid_type"] == "RoCEv2"  # the IPv4-mapped RoCEv2 GID
    json.dumps(d)


async def test_a_guarded_endpoint_refuses_at_the_handshake_and_makes_no_queue_pair(rdma_pair):
    """rdma over the fake NIC (a test double: no RDMA hardware here): a refused producer's queue
    pair is closed, and the consumer made none for it."""
    nic, (a, b) = await rdma_pair()
    b.guard(KEY)
    for credential in LIARS.values():
        with pytest.raises(Refused):
            await a.connect(b.descriptor, timeout=10, credential=credential)
    assert nic.qps == {} and a._offers == {}
    assert b.stats()["connections_refused"] == len(LIARS)
    async with await a.connect(b.descriptor, timeout=10, credential=GOOD) as sender:
        await sender.send({"seq": 1}, {"x": torch.arange(10)}, timeout=10)
    with await b.recv(timeout=10) as msg:
        assert msg.header == {"seq": 1}


@pytest.mark.parametrize("in_order", [True, False])
async def test_fake_nic_rendezvous_writes_into_the_granted_region(rdma_pair, in_order):
    """Messages of grant_min_bytes and more are RDMA-written into a region the consumer registered
    and granted (the fake NIC checks every write against the region's rkey and bounds), then PUT:
    the consumer's tensors view that region, and the pool takes it back on release."""
    nic, (a, b) = await rdma_pair(in_order=in_order, grant_min_bytes=64 << 10, grant_bytes=8 << 20)
    await asyncio.gather(exchange(a, b, 16, 4), exchange(b, a, 16, 5))
    for end in (a, b):
        stats = end.stats()
        assert stats["messages_received"] == 16
        assert 0 < stats["grant_pool_bytes"] <= stats["grant_pool_limit"] == 8 << 20
    sender = await a.connect(b.descriptor, timeout=10)
    payload = torch.arange(3 << 20, dtype=torch.uint8)
    await sender.send({"big": 1}, {"x": payload}, timeout=10)
    with await b.recv(timeout=10) as msg:
        assert msg.zero_copy and torch.equal(msg.tensors["x"], payload)
        views = msg.tensors["x"].data_ptr()
        assert any(region.view.nbytes >= payload.nbytes and
                   numpy.frombuffer(region.view, numpy.uint8).ctypes.data == views for region in b._regions.values())
    await sender.aclose()
