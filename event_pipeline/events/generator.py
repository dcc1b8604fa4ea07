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

After the day's first few draws (volume, users, weights), every draw is `random()`, so the rest of
the stream is drawn in blocks by numpy's MT19937 started from the very state of Python's
generator: numpy's `random_sample` computes `random()`'s 53-bit doubles from the same words, and
`random.choices` (bisect on cumulative weights) is `searchsorted(side="right")`. The events come
out in batches of whole minutes (`EventBatch`), the same values the one-event-at-a-time recipe
above gives (tests/test_events_api.py pins the bytes).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from itertools import accumulate
from typing import NamedTuple

import numpy as np

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
BATCH_EVENTS = 8192  # a batch is whole minutes of about this many events
_COUNT_BLOCK = 1 << 20  # minute draws per block while counting events per minute


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


@dataclass(frozen=True)
class EventBatch:
    """Consecutive events of one day: whole minutes, sorted by timestamp.

    Event k of the batch is `Event(f"{id_prefix}{first_ordinal + k:07d}", users[user_index[k]],
    at_ms[k], EVENT_TYPES[type_index[k]])`.
    """

    id_prefix: str  # "YYYYMMDD-"
    first_ordinal: int
    users: list[str]
    at_ms: np.ndarray  # int64, milliseconds since the Unix epoch, UTC
    user_index: np.ndarray  # into users
    type_index: np.ndarray  # into EVENT_TYPES

    def __len__(self) -> int:
        return len(self.at_ms)

    def events(self) -> Iterator[Event]:
        ordinals = range(self.first_ordinal, self.first_ordinal + len(self))
        users = self.users
        for ordinal, at_ms, user, kind in zip(
            ordinals,
            self.at_ms.tolist(),
            self.user_index.tolist(),
            self.type_index.tolist(),
            strict=True,
        ):
            yield Event(f"{self.id_prefix}{ordinal:07d}", users[user], at_ms, EVENT_TYPES[kind])


def _numpy_twin(rng: random.Random) -> np.random.RandomState:
    """A numpy MT19937 whose `random_sample` continues `rng.random()`'s stream exactly."""
    _, internal, _ = rng.getstate()
    twin = np.random.RandomState()
    twin.set_state(("MT19937", np.array(internal[:-1], dtype=np.uint32), internal[-1]))
    return twin


def _choices(draws: np.ndarray, cum_weights: list[int]) -> np.ndarray:
    """`random.choices(range(n), cum_weights=...)` of the given `random()` draws."""
    cumulative = np.array(cum_weights, dtype=np.float64)
    picked = np.searchsorted(cumulative, draws * float(cum_weights[-1]), side="right")
    return np.minimum(picked, len(cum_weights) - 1)  # choices' hi=n-1 bound


def generate_day_batches(day: date, events_per_day: int | None = None) -> Iterator[EventBatch]:
    """The events of one UTC day in batches (see generate_day)."""
    if events_per_day is not None and events_per_day < 0:
        raise ValueError(f"events_per_day must be >= 0, got {events_per_day}")
    rng = random.Random(stable_seed(f"event-stats:day:{day.isoformat()}"))
    total = rng.randint(*DEFAULT_EVENTS_RANGE)
    if events_per_day is not None:
        total = events_per_day
    users = rng.sample(USER_POOL, rng.randint(*USERS_PER_DAY_RANGE))
    # Some users are much busier than others, as in real traffic.
    user_weights = list(accumulate(rng.randint(1, 20) for _ in users))
    type_weights = list(accumulate(EVENT_TYPE_WEIGHTS))
    twin = _numpy_twin(rng)

    counts = np.zeros(MINUTES_PER_DAY, dtype=np.int64)
    for done in range(0, total, _COUNT_BLOCK):
        minutes = (twin.random_sample(min(_COUNT_BLOCK, total - done)) * MINUTES_PER_DAY).astype(
            np.int64
        )
        counts += np.bincount(minutes, minlength=MINUTES_PER_DAY)

    prefix = f"{day.year:04d}{day.month:02d}{day.day:02d}-"
    day_ms = (day - _EPOCH).days * 86_400_000
    ordinal = 1
    first_minute = 0
    # Each minute draws its events' offsets, then their users, then their types.
    ends = np.cumsum(counts)
    while first_minute < MINUTES_PER_DAY:
        done = ends[first_minute - 1] if first_minute else 0
        last_minute = int(np.searchsorted(ends, done + BATCH_EVENTS, side="left"))
        last_minute = min(last_minute, MINUTES_PER_DAY - 1)
        minutes = np.arange(first_minute, last_minute + 1)
        first_minute = last_minute + 1
        per_minute = counts[minutes]
        size = int(per_minute.sum())
        if not size:
            continue
        draws = twin.random_sample(3 * size)
        before = np.cumsum(per_minute) - per_minute  # events of the batch before each minute
        minute = np.repeat(minutes, per_minute)
        count = np.repeat(per_minute, per_minute)
        position = np.arange(size) - np.repeat(before, per_minute)  # within its minute
        offset_at = np.repeat(3 * before, per_minute) + position
        offsets = (draws[offset_at] * MS_PER_MINUTE).astype(np.int64)
        at_ms = np.sort(day_ms + minute * MS_PER_MINUTE + offsets)  # minutes ascend: per minute
        who = _choices(draws[offset_at + count], user_weights)
        what = _choices(draws[offset_at + 2 * count], type_weights)
        yield EventBatch(prefix, ordinal, users, at_ms, who, what)
        ordinal += size


def generate_day(day: date, events_per_day: int | None = None) -> Iterator[Event]:
    """The events of one UTC day, sorted by timestamp, event_id `YYYYMMDD-NNNNNNN` by position."""
    for batch in generate_day_batches(day, events_per_day):
        yield from batch.events()


def generate_range_batches(
    start: date, end: date, events_per_day: int | None = None
) -> Iterator[EventBatch]:
    """The events of the UTC days [start, end) in batches, sorted by timestamp."""
    day = start
    while day < end:
        yield from generate_day_batches(day, events_per_day)
        day += timedelta(days=1)


def generate_range(start: date, end: date, events_per_day: int | None = None) -> Iterator[Event]:
    """The events of the UTC days [start, end), sorted by timestamp."""
    for batch in generate_range_batches(start, end, events_per_day):
        yield from batch.events()
