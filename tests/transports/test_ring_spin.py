"""RingTransport.recv spins before it sleeps only while messages have been coming back to back.

Real shm endpoints in one process; ``_yield_cpu`` (the spin's body) is counted, not replaced in
behaviour: it still yields.
"""

from __future__ import annotations

import asyncio

import pytest

import transports.ringtransport as rt
from transports import open_transport


@pytest.fixture
def spins(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = rt._yield_cpu

    def counted() -> None:
        calls.append(1)
        real()

    monkeypatch.setattr(rt, "_yield_cpu", counted)
    return calls


async def test_sparse_messages_do_not_spin_and_a_burst_does(spins):
    a = await open_transport("shm", ring_bytes=1 << 20)
    b = await open_transport("shm", ring_bytes=1 << 20)
    try:
        sender = await a.connect(b.descriptor, timeout=30)

        async def sparse():
            for i in range(5):
                await asyncio.sleep(0.02)
                await sender.send({"i": i}, {})

        sending = asyncio.create_task(sparse())
        for i in range(5):
            with await b.recv(timeout=10) as msg:
                assert msg.header == {"i": i}
        await sending
        assert spins == [], "recv spun for messages 20 ms apart"

        for i in range(50):  # back to back: all in the ring before the receiver looks
            await sender.send({"i": i}, {})
        for i in range(50):
            with await b.recv(timeout=10) as msg:
                assert msg.header == {"i": i}
        assert spins == []  # every one was waiting: nothing to spin for

        async def one_more():
            await asyncio.sleep(0.01)
            await sender.send({"i": "next"}, {})

        sending = asyncio.create_task(one_more())
        with await b.recv(timeout=10) as msg:  # the ring is empty now: after a burst, recv spins first
            assert msg.header == {"i": "next"}
        await sending
        assert spins, "recv did not spin after a burst of back-to-back messages"
        await sender.aclose()
    finally:
        await a.aclose()
        await b.aclose()


async def test_an_unknown_spin_policy_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="auto, always"):
        await open_transport("shm", spin="sometimes")
