"""Who and where this process is, for descriptors and ``auto`` selection."""

from __future__ import annotations

import functools
import hashlib
import os
import socket


@functools.cache
def host_id() -> str:
    """A stable id of this kernel: equal for every process and container on one host.

    The kernel's boot id is shared by all containers of a host (unlike
    /etc/machine-id, which images copy); the hostname is the fallback.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            seed = f.read().strip()
    except OSError:
        seed = socket.gethostname()
    return hashlib.sha1(seed.encode()).hexdigest()[:16]


@functools.cache
def shm_namespace() -> str:
    """Identifies the /dev/shm mount: two processes share memory only if these match."""
    try:
        st = os.stat("/dev/shm")
    except OSError:
        return ""
    return f"{st.st_dev:x}:{st.st_ino:x}"
