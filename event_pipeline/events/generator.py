"""Deterministic synthetic events, one independent stream per UTC day.

A day's events depend only on the day's date string and the requested volume: the seed is a
SHA-256 of the ISO date (never Python's salted hash(), never the local clock), so every process
under every TZ produces the same events, and [D, D+7) is exactly the seven single days chained.

Only exact operations are used on the random stream (Mersenne Twister integers and `random()`
multiplied by integers, which IEEE 754 rounds the same everywhere), so the bytes do not depend on
the platform's math library either.

Memory stays small at any volume: the day is cut into minutes, the minute of every event is
drawn first (only the 1440 per-minute counts are kept), then each minute's events are drawn and
sorted on their own.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from datetime import date, timedelta
from itertools import accumulate
from typing import NamedTuple

MINUTES_PER_DAY = 24 * 60
MS_PER_MINUTE = 60_000
# Like the book's API: 200 to 2000 events and 50 to 100 users a day when no volume is given.
DEFAULT_EVENTS_RANGE = (200, 2000)
USERS_PER_DAY_RANGE = (50, 100)
# Users recur across days: each day picks its users from one fixed pool.
USER_POOL_SIZE = 1000
EVENT_TYPES = ("page_view", "click", "search", "add_to_cart", "purchase")
EVENT_TYPE_WEIGHTS = (50, 25, 15, 7, 3)
_EPOCH = date(1970, 1, 1)


class Event(NamedTuple):
    event_id: str
    user: str
    at_ms: int  # milliseconds since the Unix epoch, UTC
    event_type: str


def stable_seed(text: str) -> int:
    """A seed that is the same in every process and on every machine (unlike hash())."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _ipv4(value: int) -> str:
    return f"{value >> 24 & 255}.{value >> 16 & 255}.{value >> 8 & 255}.{value & 255}"


def _user_pool() -> list[str]:
    rng = random.Random(stable_seed("event-stats:user-pool"))
    pool: dict[str, None] = {}
    while len(pool) < USER_POOL_SIZE:
        # First octet 1..223: ordinary unicast-looking addresses.
        pool[_ipv4(rng.randrange(1, 224) << 24 | rng.getrandbits(24))] = None
    return list(pool)


USER_POOL = _user_pool()


def generate_day(day: date, events_per_day: int | None = None) -> Iterator[Event]:
    """The events of one UTC day, sorted by timestamp, event_id `YYYYMMDD-NNNNNNN` by position."""
    if events_per_day is not None and events_per_day < 0:
        raise ValueError(f"events_per_day must be >= 0, got {events_per_day}")
    rng = random.Random(stable_seed(f"event-stats:day:{day.isoformat()}"))
    rand = rng.random
    total = rng.randint(*DEFAULT_EVENTS_RANGE)
    if events_per_day is not None:
        total = events_per_day
    users = rng.sample(USER_POOL, rng.randint(*USERS_PER_DAY_RANGE))
    # Some users are much busier than others, as in real traffic.
    user_weights = list(accumulate(rng.randint(1, 20) for _ in users))
    type_weights = list(accumulate(EVENT_TYPE_WEIGHTS))

    counts = [0] * MINUTES_PER_DAY
    for _ in range(total):
        counts[int(rand() * MINUTES_PER_DAY)] += 1

    prefix = f"{day.year:04d}{day.month:02d}{day.day:02d}-"
    day_ms = (day - _EPOCH).days * 86_400_000
    ordinal = 0
    for minute, count in enumerate(counts):
        if not count:
            continue
        minute_ms = day_ms + minute * MS_PER_MINUTE
        offsets = sorted([int(rand() * MS_PER_MINUTE) for _ in range(count)])
        who = rng.choices(users, cum_weights=user_weights, k=count)
        what = rng.choices(EVENT_TYPES, cum_weights=type_weights, k=count)
        for offset, user, event_type in zip(offsets, who, what, strict=True):
            ordinal += 1
            yield Event(f"{prefix}{ordinal:07d}", user, minute_ms + offset, event_type)


def generate_range(start: date, end: date, events_per_day: int | None = None) -> Iterator[Event]:
    """The events of the UTC days [start, end), sorted by timestamp."""
    day = start
    while day < end:
        yield from generate_day(day, events_per_day)
        day += timedelta(days=1)
