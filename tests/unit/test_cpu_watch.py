"""How often the CPU-limit watch looks: often enough for the limit, no more (idle CPU)."""

import threading

from durable.objectproc.cpulimit import CpuWatch, watch_period


def test_the_watch_looks_once_a_second_at_the_default_limit_and_often_for_short_ones():
    assert watch_period(30.0) == 1.0  # the default cpu_limit_ms (30,000): it was 20 a second
    assert watch_period(300.0) == 1.0  # never less often than once a second
    assert watch_period(2.0) == 2.0 / 30
    assert watch_period(0.2) == 0.05  # never more often than 20 a second


def test_a_hold_is_noticed_within_a_thirtieth_of_the_limit_or_a_twentieth_of_a_second():
    for limit in (0.01, 0.1, 0.5, 1.0, 1.5, 3.0, 10.0, 30.0, 60.0, 3600.0):
        period = watch_period(limit)
        assert period <= max(limit / 30, 0.05), limit
        assert watch_period(limit * 2) >= period  # a longer limit never looks more often


def test_a_watch_takes_its_period_from_the_smallest_limit_unless_told():
    mark = [0.0, 0.0]
    before = threading.active_count()
    assert CpuWatch(mark, 30.0).period == 1.0
    assert CpuWatch(mark, 0.3).period == 0.05
    assert CpuWatch(mark, 30.0, period=0.2).period == 0.2
    assert threading.active_count() == before  # (made, not started: start() starts it)
