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
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
import time

from .errors import ProtocolError, TransportError, TransportUnavailable
from .host import host_id, shm_namespace
from .ring import CREDIT_BYTES, RingConfig
from .ringtransport import Region, RingTransport, Writer, ring_config

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
            elif os.fstat(fd).st_size < size:
                raise ProtocolError(f"shared memory {name} is smaller than announced")
            # MAP_POPULATE faults every page in now, not during the first messages.
            self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE)
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

    @classmethod
    async def open(cls, *, host: str = "127.0.0.1", advertise_host: str | None = None,
                   ring_bytes: int | None = None, hwm_bytes: int | None = None,
                   chunk_bytes: int | None = None, send_timeout: float = 30.0,
                   handshake_timeout: float = 10.0, spin_s: float = 100e-6,
                   spin: str = "auto",
                   max_message_bytes: int = 2 << 30) -> ShmTransport:
        """Open an endpoint; its side channel listens on ``host`` (TCP, port chosen by the OS).

        ``ring_bytes`` (default 32 MiB) is the shared memory each inbound
        connection holds, plus a 128-byte credit region at the producer.
        """
        if _posixshmem is None or not os.path.isdir(SHM_DIR):
            raise TransportUnavailable(
                f"shm transport needs POSIX shared memory ({SHM_DIR}); use --transport tcp on this machine")
        sweep_stale_segments()
        self = cls(host=host, advertise_host=advertise_host,
                   config=ring_config(ring_bytes, hwm_bytes, chunk_bytes), send_timeout=send_timeout,
                   handshake_timeout=handshake_timeout, spin_s=spin_s, max_message_bytes=max_message_bytes,
                   spin=spin)
        await self._start()
        return self

    def _descriptor_extra(self) -> dict:
        return {"shm_ns": shm_namespace(), "ring_bytes": self.config.size}

    def _offer(self) -> tuple[Region, dict]:
        name = _new_name()
        return _Segment(name, CREDIT_BYTES, create=True), {"credit": name, "host_id": host_id(),
                                                           "shm_ns": shm_namespace()}

    def _accept(self, offer: dict, config: RingConfig) -> tuple[Region, Writer, dict]:
        if offer.get("host_id") != host_id() or offer.get("shm_ns") != shm_namespace():
            raise TransportError("shm peer is on another host or /dev/shm; use the tcp or rdma transport")
        name = offer.get("credit")
        if not (isinstance(name, str) and name.startswith(PREFIX) and "/" not in name):
            raise ProtocolError(f"bad credit segment name {name!r}")
        credit = _Segment(name, CREDIT_BYTES, create=False)
        credit.unlink()
        try:
            data = _Segment(_new_name(), config.data_region_bytes, create=True)
        except BaseException:
            credit.close()
            raise
        return data, credit, {"data": data.name}

    def _complete(self, answer: dict, config: RingConfig) -> Writer:
        name = answer.get("data")
        if not (isinstance(name, str) and name.startswith(PREFIX) and "/" not in name):
            raise ProtocolError(f"bad data segment name {name!r}")
        data = _Segment(name, config.data_region_bytes, create=False)
        data.unlink()
        return data
