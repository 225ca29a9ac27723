"""``shm``: the double ring over POSIX shared memory, between processes of one host.

Per connection the consumer creates the data segment and the producer the
credit segment, each ``0600``. Each side maps the other's segment and then
unlinks its name at once, so once a connection is up no name is left in
/dev/shm: a process that dies, even by SIGKILL, leaks nothing (the kernel
frees the memory with the last mapping). The producer's ``memcpy`` into the
consumer's mapping *is* the one-sided write of the protocol.

Names only exist for the few milliseconds of a handshake. A process killed
inside that window can leave one behind; :func:`sweep_stale_segments`, run
when an endpoint opens, removes ours whose creator is dead and which are
older than a minute.

Rendezvous (``transports/grants.py``): a granted region is a segment of its
own, made by the consumer (pre-faulted, advised to use huge pages where
/dev/shm allows them), named in the grant and unlinked by the producer as
soon as it has mapped it. The producer copies a large payload straight into
it, or the compute writes it there in the first place (``Sender.allocate``);
the consumer's tensors view it. Both sides keep the mapping while the region
lives, so a region that is granted again costs no fault and no syscall.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
import time

from .errors import ProtocolError, TransportError, TransportUnavailable
from .host import host_id, shm_namespace
from .grants import GrantPool
from .ring import CREDIT_BYTES, RingConfig
from .ringtransport import GRANT_BYTES, GRANT_MIN_BYTES, GrantRegion, Region, RingTransport, Writer, ring_config

try:
    import _posixshmem
except ImportError:  # pragma: no cover - not a POSIX build
    _posixshmem = None

log = logging.getLogger(__name__)

PREFIX = "onepiece-"
SHM_DIR = "/dev/shm"
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class _Segment(Region, Writer):
    """A mapped POSIX shared-memory segment: our region, or our window on the peer's."""

    def __init__(self, name: str, size: int, *, create: bool):
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            fd = _posixshmem.shm_open("/" + name, flags, mode=0o600)
        except OSError as exc:
            raise TransportError(f"cannot {'create' if create else 'open'} shared memory {name}: {exc}") from exc
        self.name = name
        self._linked = True
        try:
            if create:
                os.ftruncate(fd, size)
                try:
                    # Reserve the pages now: a full /dev/shm is an error here, not a SIGBUS at the
                    # first write into a page tmpfs cannot back.
                    os.posix_fallocate(fd, 0, size)
                except OSError as exc:
                    raise TransportError(f"cannot allocate {size >> 20} MiB of shared memory in "
                                         f"{SHM_DIR}: {exc} (raise its size, e.g. shm_size)") from exc
            elif os.fstat(fd).st_size < size:
                raise ProtocolError(f"shared memory {name} is smaller than announced")
            # MAP_POPULATE faults every page in now, not during the first messages.
            self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE)
            if size >= 2 << 20 and hasattr(mmap, "MADV_HUGEPAGE"):
                try:
                    self._map.madvise(mmap.MADV_HUGEPAGE)
                except OSError:  # /dev/shm without huge pages: still correct
                    pass
        except BaseException:
            self.unlink()
            raise
        finally:
            os.close(fd)
        self.view = memoryview(self._map)

    def write(self, offset: int, parts) -> None:
        view = self.view
        for part in parts:
            n = len(part) if isinstance(part, bytes) else part.nbytes
            view[offset : offset + n] = part
            offset += n

    def reach(self, handle: bytes, size: int) -> _Segment:
        name = _check_name(handle.decode("ascii", "replace"), "granted region")
        region = _Segment(name, size, create=False)
        region.unlink()
        return region

    def unlink(self) -> None:
        if self._linked:
            self._linked = False
            try:
                _posixshmem.shm_unlink("/" + self.name)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self.unlink()
        self.view.release()
        try:
            self._map.close()
        except BufferError:
            # A tensor still views the mapping; it is unmapped when that goes.
            pass


class _GrantSegment(_Segment, GrantRegion):
    """A segment the consumer grants: the producer learns its name from the grant."""

    def __init__(self, size: int):
        super().__init__(_new_name(), size, create=True)
        self.handle = self.name.encode()


def _check_name(name, what: str) -> str:
    if not (isinstance(name, str) and name.startswith(PREFIX) and "/" not in name):
        raise ProtocolError(f"bad {what} name {name!r:.80}")
    return name


def _new_name() -> str:
    return f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}"


def sweep_stale_segments(max_age_s: float = 60.0) -> list[str]:
    """Unlink our segments whose creating process is gone (left by a kill mid-handshake)."""
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        if not name.startswith(PREFIX):
            continue
        try:
            pid = int(name[len(PREFIX) :].split("-", 1)[0])
            if now - os.stat(os.path.join(SHM_DIR, name)).st_mtime < max_age_s:
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
            except OSError:
                pass
        except (ValueError, OSError):
            continue
    if removed:
        log.warning("removed %d stale shared-memory segments: %s", len(removed), ", ".join(removed))
    return removed


class ShmTransport(RingTransport):
    """The double-ring transport over POSIX shared memory (one host)."""

    name = "shm"
    grants = maps_regions = True

    @classmethod
    async def open(cls, *, host: str = "127.0.0.1", advertise_host: str | None = None,
                   ring_bytes: int | None = None, hwm_bytes: int | None = None,
                   chunk_bytes: int | None = None, send_timeout: float = 30.0,
                   handshake_timeout: float = 10.0, spin_s: float = 100e-6,
                   spin: str = "auto", grant_bytes: int = GRANT_BYTES, grant_min_bytes: int = GRANT_MIN_BYTES,
                   grant_pool: GrantPool | None = None,
                   max_message_bytes: int = 2 << 30) -> ShmTransport:
        """Open an endpoint; its side channel listens on ``host`` (TCP, port chosen by the OS).

        ``ring_bytes`` (default 32 MiB) is the shared memory each inbound
        connection holds, plus a 256-byte credit region at the producer;
        ``grant_bytes`` (default 512 MiB) bounds the regions granted for
        messages of ``grant_min_bytes`` (8 MiB) and more, all connections together.
        """
        if _posixshmem is None or not os.path.isdir(SHM_DIR):
            raise TransportUnavailable(
                f"shm transport needs POSIX shared memory ({SHM_DIR}); use --transport tcp on this machine")
        sweep_stale_segments()
        self = cls(host=host, advertise_host=advertise_host,
                   config=ring_config(ring_bytes, hwm_bytes, chunk_bytes), send_timeout=send_timeout,
                   handshake_timeout=handshake_timeout, spin_s=spin_s, max_message_bytes=max_message_bytes,
                   spin=spin, grant_bytes=grant_bytes, grant_min_bytes=grant_min_bytes, grant_pool=grant_pool)
        await self._start()
        return self

    def _descriptor_extra(self) -> dict:
        return {"shm_ns": shm_namespace(), "ring_bytes": self.config.size}

    def _make_region(self, size: int) -> _GrantSegment:
        return _GrantSegment(size)

    def _offer(self) -> tuple[Region, dict]:
        name = _new_name()
        return _Segment(name, CREDIT_BYTES, create=True), {"credit": name, "host_id": host_id(),
                                                           "shm_ns": shm_namespace()}

    def _accept(self, offer: dict, config: RingConfig) -> tuple[Region, Writer, dict]:
        if offer.get("host_id") != host_id() or offer.get("shm_ns") != shm_namespace():
            raise TransportError("shm peer is on another host or /dev/shm; use the tcp or rdma transport")
        name = _check_name(offer.get("credit"), "credit segment")
        credit = _Segment(name, CREDIT_BYTES, create=False)
        credit.unlink()
        try:
            data = _Segment(_new_name(), config.data_region_bytes, create=True)
        except BaseException:
            credit.close()
            raise
        return data, credit, {"data": data.name}

    def _complete(self, answer: dict, config: RingConfig) -> Writer:
        name = _check_name(answer.get("data"), "data segment")
        data = _Segment(name, config.data_region_bytes, create=False)
        data.unlink()
        return data
