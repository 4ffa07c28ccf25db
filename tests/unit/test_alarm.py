"""The sync stores' alarms: the one watchdog thread that bounds every PostgreSQL statement.

Arming only appends (the thread is woken only for an alarm due before the one it
sleeps toward), so these prove that the thread still rings every alarm that is not
disarmed, earliest first, never one that is, and starts again in a forked child.
"""

from __future__ import annotations

import gc
import multiprocessing
import threading
import weakref

from memshift.stores._sync._clients import Alarm

WAIT = 10.0  # seconds an alarm due in a fraction of one may take on a busy machine


def test_an_alarm_armed_while_the_watchdog_sleeps_toward_a_later_one_rings_first() -> None:
    rung: list[str] = []
    done = threading.Event()
    late = Alarm(0.5, lambda: (rung.append("late"), done.set()))
    early = Alarm(0.05, lambda: rung.append("early"))

    assert done.wait(WAIT)
    assert rung == ["early", "late"]
    assert early.rang and late.rang


def test_once_disarm_returns_the_alarm_has_rung_or_never_will() -> None:
    rings: list[int] = []
    # Due from now to 40 ms on: some ring before they are disarmed, most do not.
    alarms = [Alarm(0.01 * (i % 5), lambda i=i: rings.append(i)) for i in range(3000)]
    rang_before = set()
    for i, alarm in enumerate(alarms):
        alarm.disarm()
        if alarm.rang:
            rang_before.add(i)
    done = threading.Event()
    last = Alarm(0.1, done.set)  # due after every other one

    assert done.wait(WAIT)
    assert last.rang
    assert sorted(rings) == sorted(rang_before)
    assert len(rang_before) < len(alarms)


def test_a_disarmed_alarm_does_not_keep_what_it_would_ring() -> None:
    class Connection:
        def sever(self) -> None:
            raise AssertionError("a disarmed alarm rang")

    connection = Connection()
    kept = weakref.ref(connection)
    Alarm(60.0, connection.sever).disarm()
    del connection
    gc.collect()

    assert kept() is None


def test_alarms_armed_from_many_threads_all_ring() -> None:
    count = 400
    rang = threading.Semaphore(0)

    def arm(first: int) -> None:
        for i in range(first, count, 4):
            Alarm(0.001 * (i % 50), rang.release)

    threads = [threading.Thread(target=arm, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert all(rang.acquire(timeout=WAIT) for _ in range(count))


def _ring_in_child(result: multiprocessing.SimpleQueue[bool]) -> None:
    done = threading.Event()
    Alarm(0.05, done.set)
    result.put(done.wait(WAIT))


def test_a_forked_child_gets_a_watchdog_of_its_own() -> None:
    done = threading.Event()
    Alarm(0.01, done.set)
    assert done.wait(WAIT)  # the parent's thread runs: the child inherits none of it
    context = multiprocessing.get_context("fork")
    result: multiprocessing.SimpleQueue[bool] = context.SimpleQueue()
    child = context.Process(target=_ring_in_child, args=(result,))
    child.start()
    child.join(WAIT * 2)

    assert child.exitcode == 0
    assert result.get() is True
