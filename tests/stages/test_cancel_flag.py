"""stages.kinds.CancelFlag: the cancellation flag a running stage polls or waits on."""

from __future__ import annotations

import threading

from stages.kinds import CancelFlag


def test_unset_flag_reports_false_without_blocking_for_zero_and_negative_timeouts():
    flag = CancelFlag()
    assert not flag.is_set()
    assert flag.wait(0) is False
    assert flag.wait(-1) is False
    assert flag.wait(0.01) is False


def test_a_set_flag_answers_at_once_and_stays_set():
    flag = CancelFlag()
    flag.set()
    flag.set()
    assert flag.is_set()
    assert flag.wait(0) is True
    assert flag.wait() is True


def test_set_from_another_thread_wakes_a_waiter_that_would_otherwise_wait_a_minute():
    flag = CancelFlag()
    waiting = threading.Event()
    got: list[bool] = []

    def stage():
        waiting.set()
        got.append(flag.wait(60.0))

    t = threading.Thread(target=stage)
    t.start()
    waiting.wait(5)
    flag.set()
    t.join(10)
    assert not t.is_alive(), "the waiter was not woken by set()"
    assert got == [True]


def test_many_racing_waiters_and_a_setter_all_see_the_flag():
    for _ in range(50):
        flag = CancelFlag()
        results: list[bool] = []
        waiters = [threading.Thread(target=lambda: results.append(flag.wait(30.0))) for _ in range(4)]
        for w in waiters:
            w.start()
        flag.set()
        for w in waiters:
            w.join(10)
        assert results == [True] * 4
