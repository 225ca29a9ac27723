"""Test hosts on one machine: network namespaces on a bridge, real kernel networking.

Each host has its own network namespace (an address on a private bridge), hostname (UTS
namespace), ``/etc/hosts`` name table and private ``/dev/shm`` and data directory (a mount
namespace with tmpfs of its own), and its own PID namespace, so killing its init kills every
process of that host at once, as a host that loses power does.

    python -m tests.hosts up NAME [--hosts 3]   # make them; prints them as JSON
    python -m tests.hosts run NAME HOST -- CMD  # run a command on one (its exit code is returned)
    python -m tests.hosts down NAME             # tear everything of NAME down
    (scripts/testhosts.sh wraps these)

Safety, checked before any traffic: the bridge gets an address in the test subnet (a /24 in
10.77.0.0/16 no interface uses yet), and ``ip route get`` must say that the hosts' addresses
route through the bridge; otherwise everything is torn down and nothing is sent (without the
bridge's address, traffic from here to the subnet would leave the machine by the default
route). Hosts only talk inside the subnet: no default route, no NAT.

Needs root (namespaces, veth, bridges). ``available()`` says why not, for a clear skip.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_ROOT = Path("/tmp/onepiece-testhosts")
SHM_BYTES = "1g"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def available() -> str | None:
    """None if test hosts can be made here, else why not."""
    if os.geteuid() != 0:
        return "test hosts need root (network, mount and PID namespaces)"
    for tool in ("ip", "unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"test hosts need {tool}, which is not installed"
    return None


@dataclass
class Host:
    name: str  # h1, h2, ...: also its hostname and its name in every host's /etc/hosts
    address: str
    netns: str
    veth: str  # the bridge's side of its link (down = the host is cut off)
    data_dir: str  # a private tmpfs, seen only by this host
    init_pid: int = 0  # PID 1 of the host's PID namespace, as the root namespace numbers it

    def command(self, argv: list[str], cwd: str | None = None) -> list[str]:
        """``argv`` run on this host (its network, hostname, mounts and PID namespace)."""
        wd = ["--wd=" + cwd] if cwd else []
        return ["nsenter", "-t", str(self.init_pid), "-n", "-u", "-m", "-p", *wd, "--", *argv]

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        """Start ``argv`` on this host. The Popen is ``nsenter``; the process itself is its child
        (:func:`child_of`), and it dies with the host (:meth:`kill_all`)."""
        return subprocess.Popen(self.command(argv, kw.pop("cwd", None)), **kw)

    def run(self, argv: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), capture_output=True, text=True, timeout=timeout, **kw)

    def kill_all(self) -> None:
        """Every process of this host, at once (SIGKILL to its PID namespace's init)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.init_pid, signal.SIGKILL)

    def link(self, up: bool) -> None:
        """Connect the host to the bridge, or cut it off (its processes go on, unreachable)."""
        _ip("link", "set", self.veth, "up" if up else "down")


def child_of(pid: int, timeout: float = 10.0) -> int:
    """The (first) child of ``pid``: the process an ``nsenter`` started."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        if children:
            return int(children[0])
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {pid} started no child within {timeout} s")
        time.sleep(0.02)


@dataclass
class TestHosts:
    """``count`` hosts named h1..hN on a bridge of their own; ``up()`` makes them, ``down()``
    removes everything it made (also after a partial ``up``)."""

    name: str
    count: int = 3
    subnet: str = ""  # "10.77.N", chosen at up()
    bridge: str = ""
    hosts: list[Host] = field(default_factory=list)
    _boots: list[subprocess.Popen] = field(default_factory=list, repr=False, compare=False)

    __test__ = False  # not a pytest test class

    @property
    def state_dir(self) -> Path:
        return STATE_ROOT / self.name

    @property
    def gateway(self) -> str:
        """The bridge's address: where the root namespace (the test) talks to the hosts from."""
        return f"{self.subnet}.1"

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    # -- making them ---------------------------------------------------------------------------

    def _free_subnet(self) -> str:
        used = _ip("-4", "-o", "addr").stdout + _ip("-4", "route").stdout
        free = [n for n in range(1, 255) if f"10.77.{n}." not in used]
        if not free:
            raise RuntimeError("no free /24 in 10.77.0.0/16 for test hosts")
        return f"10.77.{random.choice(free)}"

    def up(self) -> TestHosts:
        if why := available():
            raise RuntimeError(why)
        tag = self.name[-6:]
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.subnet = self._free_subnet()
        self.bridge = f"opbr{tag}"
        self.hosts = [Host(f"h{i}", f"{self.subnet}.{10 + i}", f"op-{self.name}-h{i}", f"opv{tag}{i}",
                           str(self.state_dir / "data" / f"h{i}")) for i in range(1, self.count + 1)]
        self._save()
        try:
            self._network()
            (self.state_dir / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
                f"{h.address} {h.name}\n" for h in self.hosts))
            for h in self.hosts:
                self._boot(h)
            self._save()
        except BaseException:
            self.down()
            raise
        return self

    def _network(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        # bridged frames between the hosts skip iptables (docker's FORWARD policy is DROP)
        _ip("link", "set", self.bridge, "type", "bridge", "nf_call_iptables", "0", check=False)
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for h in self.hosts:  # the safety check, before anything is sent to the subnet
            route = _ip("route", "get", h.address).stdout
            if f"dev {self.bridge}" not in route:
                raise RuntimeError(f"{h.address} would not route through {self.bridge} but: {route.strip()!r}; "
                                   "sending nothing")
        for h in self.hosts:
            _ip("netns", "add", h.netns)
            _ip("link", "add", h.veth, "type", "veth", "peer", "name", f"{h.veth}p")
            _ip("link", "set", f"{h.veth}p", "netns", h.netns)
            _ip("link", "set", h.veth, "master", self.bridge, "up")
            _ip("-n", h.netns, "link", "set", f"{h.veth}p", "name", "eth0")
            _ip("-n", h.netns, "addr", "add", f"{h.address}/24", "dev", "eth0")
            _ip("-n", h.netns, "link", "set", "eth0", "up")
            _ip("-n", h.netns, "link", "set", "lo", "up")

    def _boot(self, h: Host) -> None:
        """The host's init: new UTS, mount and PID namespaces inside its network namespace,
        its hostname, /etc/hosts, a private /dev/shm and data directory, then it sleeps."""
        Path(h.data_dir).mkdir(parents=True, exist_ok=True)
        script = (f"hostname {h.name} && mount -t tmpfs -o size={SHM_BYTES},mode=1777 tmpfs /dev/shm && "
                  f"mount -t tmpfs -o size=2g tmpfs {h.data_dir} && "
                  f"mount --bind {self.state_dir / 'hosts'} /etc/hosts && echo ready && exec sleep infinity")
        proc = subprocess.Popen(["ip", "netns", "exec", h.netns, "unshare", "--uts", "--mount", "--pid", "--fork",
                                 "--mount-proc", "--propagation", "private", "sh", "-c", script],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._boots.append(proc)
        line = proc.stdout.readline().strip()
        if line != "ready":
            proc.kill()
            raise RuntimeError(f"host {h.name} did not boot: {line!r} {proc.stderr.read()[:500]!r}")
        h.init_pid = child_of(proc.pid)

    def _save(self) -> None:
        (self.state_dir / "state.json").write_text(json.dumps(
            {"name": self.name, "count": self.count, "subnet": self.subnet, "bridge": self.bridge,
             "hosts": [asdict(h) for h in self.hosts]}, indent=1))

    @classmethod
    def load(cls, name: str) -> TestHosts:
        state = json.loads((STATE_ROOT / name / "state.json").read_text())
        hosts = [Host(**h) for h in state.pop("hosts")]
        return cls(**state, hosts=hosts)

    # -- removing them ------------------------------------------------------------------------

    def down(self) -> None:
        for h in self.hosts:
            if h.init_pid:
                h.kill_all()
        deadline = time.monotonic() + 10
        for h in self.hosts:  # the inits are gone before their network namespaces go
            while h.init_pid and Path(f"/proc/{h.init_pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        for proc in self._boots:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            proc.stdout.close()
            proc.stderr.close()
        for h in self.hosts:
            _ip("netns", "del", h.netns, check=False)
            _ip("link", "del", h.veth, check=False)
        if self.bridge:
            _ip("link", "del", self.bridge, check=False)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # the last one out
            STATE_ROOT.rmdir()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="testhosts", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up")
    up.add_argument("name")
    up.add_argument("--hosts", type=int, default=3)
    run = sub.add_parser("run")
    run.add_argument("name")
    run.add_argument("host")
    run.add_argument("argv", nargs=argparse.REMAINDER)
    down = sub.add_parser("down")
    down.add_argument("name")
    args = p.parse_args(argv)
    if args.command == "up":
        hosts = TestHosts(args.name, args.hosts).up()
        print(json.dumps({"gateway": hosts.gateway, "hosts": [asdict(h) for h in hosts.hosts]}, indent=1))
        return 0
    hosts = TestHosts.load(args.name)
    if args.command == "down":
        hosts.down()
        return 0
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    return subprocess.run(hosts.host(args.host).command(argv)).returncode


if __name__ == "__main__":
    sys.exit(main())
