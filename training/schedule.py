"""Cron expressions for `retrain.schedule`: one parser, used by the document check and by the daemon.

Five fields (minute hour day month day-of-week) as in crontab, or six with seconds first. Times are
UTC. Day-of-week numbers follow APScheduler 3 (0 = Monday); names (`mon`-`sun`) are unambiguous.
An expression is refused when two of its firings come closer than the operator's minimum interval,
so a document cannot make the daemons retrain every second.
"""

import datetime as dt

from apscheduler.triggers.cron import CronTrigger

FIELDS = ("second", "minute", "hour", "day", "month", "day_of_week")
FIRINGS_CHECKED = 1000  # gaps of a cron repeat within its first day; this covers sparser ones too
SPAN_CHECKED = dt.timedelta(days=400)  # a leap year and a month: every month's end, every weekday; a rare expression
# ("0 0 1 1 mon", once in years) is checked in a few steps, each of which searches years ahead
REFERENCE = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)  # a fixed start: a check gives the same answer every time
CYCLE = "2000-2399"  # the years a check searches: the Gregorian calendar repeats every 400 years, so an expression
# that never fires in them never fires at all, found without searching to the year 9999 (0.2 s of CPU)


class ScheduleError(ValueError):
    """An expression that cannot be used; the message says what to write instead."""


def trigger(expression: str, **fixed: str) -> CronTrigger:
    """The APScheduler trigger of a 5- or 6-field cron expression, in UTC (`fixed`: fields it cannot name)."""
    parts = expression.split()
    if len(parts) not in (5, 6):
        raise ScheduleError(f"a cron expression has 5 fields (minute hour day month day-of-week), or 6 with "
                            f"seconds first; got {len(parts)}")
    names = FIELDS[1:] if len(parts) == 5 else FIELDS
    try:
        return CronTrigger(**dict(zip(names, parts)), **fixed, timezone=dt.timezone.utc)
    except ValueError as exc:
        raise ScheduleError(f"not a valid cron expression: {exc}") from None


def shortest_gap_s(cron: CronTrigger, stop_below_s: float) -> float | None:
    """The shortest time between two firings among the first FIRINGS_CHECKED within SPAN_CHECKED of REFERENCE
    (None: it fires at most once there)."""
    shortest = None
    previous = cron.get_next_fire_time(None, REFERENCE)
    for _ in range(FIRINGS_CHECKED):
        if previous is None or previous > REFERENCE + SPAN_CHECKED:
            break
        following = cron.get_next_fire_time(previous, previous)
        if following is None:
            break
        gap = (following - previous).total_seconds()
        shortest = gap if shortest is None else min(shortest, gap)
        if shortest < stop_below_s:
            break
        previous = following
    return shortest


def check(expression: str, min_interval_s: float) -> None:
    """ScheduleError if `expression` never fires or fires more often than `min_interval_s` allows (searched within
    one CYCLE: a caller that runs the schedule builds its own trigger)."""
    within_cycle = trigger(expression, year=CYCLE)
    if within_cycle.get_next_fire_time(None, REFERENCE) is None:
        raise ScheduleError("this expression never fires")
    gap = shortest_gap_s(within_cycle, min_interval_s)
    if gap is not None and gap < min_interval_s:
        raise ScheduleError(f"two of its firings come {gap:g} s apart, under the operator's minimum of "
                            f"{min_interval_s:g} s between retrains; fire less often")


def latest_tick(cron: CronTrigger, at: dt.datetime, lookback_s: float) -> dt.datetime | None:
    """The last firing at or before `at` (searched back `lookback_s`): the tick a job that fired late belongs to."""
    tick, found = cron.get_next_fire_time(None, at - dt.timedelta(seconds=lookback_s)), None
    while tick is not None and tick <= at:
        found, tick = tick, cron.get_next_fire_time(tick, tick)
    return found
