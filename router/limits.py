"""Per-key request limits: requests per minute by action class, and requests in flight.

Usage::

    limiter = RequestLimiter(config.limits)           # clock: time.monotonic unless given
    admission = limiter.admit(key_hash, "add")
    if admission.admitted:
        try:
            ...                                      # answer the request
        finally:
            limiter.release(key_hash)

The rate is a GCRA (the "generic cell rate algorithm", a token bucket kept as one number): each
action class of a key has a bucket of `limit` requests that refills continuously, one request
every 60/limit seconds, so a key may burst up to its whole minute's quota and then goes on at
exactly `limit` per minute. The state is one float per class (the "theoretical arrival time":
when the bucket would be full again) and a counter of requests in flight: O(1) per key. A key
whose buckets are full and that has nothing in flight holds no information; such keys are
forgotten once per window, so memory follows the keys active in the last minute.

Callers admit only keys that authenticated: a flood of random keys creates no state. Each key
has its own buckets, so one key at its limit never slows another.

What `Admission` reports, for the `X-RateLimit-*` headers (delta seconds, as the IETF draft
"RateLimit header fields for HTTP" does, never a clock time that the client's clock would have
to agree with):
- `limit`: the class's requests per minute;
- `remaining`: requests the key could make in that class right now;
- `reset`: whole seconds until the next slot of the class frees (0 when the full quota is
  there); on a refusal by rate it equals `retry_after`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from router.config import Limits

WINDOW_SECONDS: Final = 60.0
ACTION_CLASSES: Final = ("add", "status", "other")
IN_FLIGHT_RETRY_SECONDS: Final = 1  # a slot frees as soon as one of the key's requests ends

_ADD, _STATUS, _OTHER = range(len(ACTION_CLASSES))
_CLASS_OF: Final[dict[str, int]] = {"add": _ADD, "status": _STATUS}
# Float slack: (60 - 20) / 20 must count 2 slots even when it computes as 1.9999999999.
_EPSILON: Final = 1e-9


def action_class(action: str) -> str:
    """`add`, `status`, or `other` for every other action, unknown ones included."""
    return ACTION_CLASSES[_CLASS_OF.get(action, _OTHER)]


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer to one request of one key in one action class."""

    admitted: bool
    limit: int  # requests per minute in the class
    remaining: int  # requests the key could make in the class right now
    reset: int  # whole seconds until the next slot frees; 0 when the full quota is there
    retry_after: int  # whole seconds to wait before trying again; 0 when admitted


class _KeyState:
    """One key: when each class's bucket is full again, and its requests in flight."""

    __slots__ = ("full_at", "in_flight")

    def __init__(self, now: float) -> None:
        self.full_at = [now] * len(ACTION_CLASSES)
        self.in_flight = 0


class RequestLimiter:
    """Every key's limits, on one clock (`time.monotonic` unless given: tests pass their own)."""

    def __init__(self, limits: Limits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.set_limits(limits)
        self._keys: dict[str, _KeyState] = {}
        self._swept_at = clock()

    def set_limits(self, limits: Limits) -> None:
        """Count against `limits` from now on (a config reload): each key keeps its buckets and
        its requests in flight, so a reload grants no key a fresh quota."""
        self.limits = limits
        self._per_minute = (limits.add, limits.status, limits.other)
        self._interval = tuple(WINDOW_SECONDS / limit for limit in self._per_minute)

    def __len__(self) -> int:
        """Keys with state (active in the last window or in flight)."""
        return len(self._keys)

    def admit(self, key: str, action: str) -> Admission:
        """Count one request of `key` for `action`, or refuse it and count nothing.

        An admitted request holds one of the key's in-flight slots: `release(key)` it when the
        answer is done, whatever happened.
        """
        now = self._clock()
        if now - self._swept_at >= WINDOW_SECONDS:
            self._forget_idle(now)
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _KeyState(now)
        index = _CLASS_OF.get(action, _OTHER)
        interval = self._interval[index]
        start = max(state.full_at[index], now)
        if state.in_flight >= self.limits.in_flight:
            remaining, reset = self._window(index, start - now)
            retry_after = reset if remaining == 0 else IN_FLIGHT_RETRY_SECONDS
            return Admission(False, self._per_minute[index], remaining, reset, retry_after)
        after = start + interval - now  # how far ahead the bucket would be full
        if after > WINDOW_SECONDS + _EPSILON:
            wait = _whole_seconds(after - WINDOW_SECONDS)
            return Admission(False, self._per_minute[index], 0, wait, wait)
        state.full_at[index] = start + interval
        state.in_flight += 1
        remaining, reset = self._window(index, after)
        return Admission(True, self._per_minute[index], remaining, reset, 0)

    def release(self, key: str) -> None:
        """An admitted request of `key` is answered: its in-flight slot is free again."""
        state = self._keys.get(key)
        if state is not None and state.in_flight > 0:
            state.in_flight -= 1

    def _window(self, index: int, ahead: float) -> tuple[int, int]:
        """(remaining, reset) of a class whose bucket is full again `ahead` seconds from now."""
        if ahead <= 0:
            return self._per_minute[index], 0
        interval = self._interval[index]
        remaining = math.floor((WINDOW_SECONDS - ahead) / interval + _EPSILON)
        # The next slot frees when `ahead` has shrunk to what remaining + 1 slots leave.
        frees_in = ahead - (WINDOW_SECONDS - (remaining + 1) * interval)
        return remaining, _whole_seconds(frees_in)

    def _forget_idle(self, now: float) -> None:
        """Drop the keys with full buckets and nothing in flight: they would start the same."""
        self._keys = {
            key: state
            for key, state in self._keys.items()
            if state.in_flight or max(state.full_at) > now
        }
        self._swept_at = now


def _whole_seconds(seconds: float) -> int:
    """Seconds rounded up to a whole one (at least 1): a client waiting that long is served."""
    return max(1, math.ceil(seconds - _EPSILON))
