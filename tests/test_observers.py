"""The observers' batches (``proxy/observe/observers.py``): when records are handed on, and
that one failing observer keeps none of the others from its batch."""

from __future__ import annotations

from proxy.observe.observers import Observers
from proxy.record import Record
from tests.polling import until


async def test_records_wait_for_a_full_batch_or_the_timer() -> None:
    seen: list[list[Record]] = []
    observers = Observers([seen.append])
    for _ in range(Observers.BATCH - 1):
        observers.ended(Record(0.0))
    assert seen == []  # waiting: neither full nor timed out
    observers.ended(Record(0.0))
    assert [len(batch) for batch in seen] == [Observers.BATCH]
    observers.ended(Record(0.0))
    await until(lambda: len(seen) == 2, within=Observers.AFTER * 3,
                what="the timer to hand on the lone record")
    assert [len(batch) for batch in seen] == [Observers.BATCH, 1]
    assert repr(observers) == "<Observers 1 waiting=0>"


async def test_a_failing_observer_does_not_stop_the_others() -> None:
    seen: list[Record] = []

    def broken(records: list[Record]) -> None:
        raise RuntimeError("boom")

    observers = Observers([broken, seen.extend])
    record = Record(0.0)
    observers.ended(record)
    observers.flush()
    assert seen == [record]
    observers.flush()  # nothing waiting: nobody is called again
    assert seen == [record]


def test_without_a_loop_records_are_handed_on_at_once() -> None:
    seen: list[Record] = []
    Observers([seen.extend]).ended(Record(0.0))
    assert len(seen) == 1
