"""ComposeLauncher: the docker commands it would run, against a fake docker (no engine here)."""

from __future__ import annotations

import itertools

import pytest

from manager.compose import ComposeError, ComposeLauncher


class FakeDocker:
    """Answers docker / docker compose argv lists the way the CLI would, and records them."""

    def __init__(self):
        self.calls: list[list[str]] = []
        self.running: dict[str, list[str]] = {}  # service -> container ids
        self.exited: dict[str, int] = {}
        self._ids = (f"{n:012x}" + "f" * 52 for n in itertools.count(0xabc000000001))

    async def __call__(self, argv: list[str]) -> tuple[int, str]:
        self.calls.append(argv)
        if argv[:2] == ["docker", "compose"]:
            cmd = argv[argv.index("-p") + 2 if "-p" in argv else 4:]
            if cmd[:2] == ["ps", "-q"]:
                services = cmd[2:] or list(self.running)
                return 0, "".join(f"{c}\n" for s in services for c in self.running.get(s, []))
            if cmd[0] == "up":
                service, n = cmd[cmd.index("--scale") + 1].split("=")
                have = self.running.setdefault(service, [])
                while len(have) < int(n):
                    have.append(next(self._ids))
                return 0, ""
        if argv[1] == "stop":
            for have in self.running.values():
                if argv[-1] in have:
                    have.remove(argv[-1])
                    self.exited[argv[-1]] = 0
            return 0, argv[-1]
        if argv[1] == "inspect":
            return 0, f"{self.exited.get(argv[-1], 137)}\n"
        if argv[1] == "rm":
            return 0, argv[-1]
        return 1, f"unexpected command {argv}"


async def test_start_scales_the_stage_service_up_by_one_and_drain_stops_that_container():
    docker = FakeDocker()
    launcher = ComposeLauncher("docker/compose.yaml", project="op", run=docker)
    base = ["docker", "compose", "-f", "docker/compose.yaml", "-p", "op"]
    first = await launcher.start("wan_i2v", "denoise")
    second = await launcher.start("wan_i2v", "denoise")
    assert docker.calls[:3] == [
        base + ["ps", "-q", "worker-denoise"],
        base + ["up", "-d", "--no-recreate", "--no-deps", "--scale", "worker-denoise=1", "worker-denoise"],
        base + ["ps", "-q", "worker-denoise"],
    ]
    assert docker.calls[4] == base + ["up", "-d", "--no-recreate", "--no-deps", "--scale", "worker-denoise=2",
                                      "worker-denoise"]
    # the handle's id is the container's hostname, which the worker registers with
    assert first.id == docker.running["worker-denoise"][0][:12] and len(first.id) == 12
    assert {h.id for h in launcher.workers()} == {first.id, second.id}
    docker.calls.clear()
    code = await launcher.drain(first, timeout=30)
    cid = first.extra["container"]
    assert docker.calls == [["docker", "stop", "--time", "30", cid],
                            ["docker", "inspect", "--format", "{{.State.ExitCode}}", cid],
                            ["docker", "rm", cid]]
    assert code == 0 and [h.id for h in launcher.workers()] == [second.id]
    await launcher.aclose(5)
    assert launcher.workers() == []


async def test_a_failing_docker_command_raises_with_its_output():
    async def broken(argv):
        return 1, "Cannot connect to the Docker daemon at unix:///var/run/docker.sock."

    launcher = ComposeLauncher("compose.yaml", run=broken, service=lambda stage: f"op-{stage}")
    with pytest.raises(ComposeError, match="ps -q op-vae_decode exited with 1: Cannot connect to the Docker"):
        await launcher.start("wan_i2v", "vae_decode")
