"""Per-user and per-channel sliding-window limits on answers. Pure logic with an injected clock.

A question is allowed when the asker has had fewer than ``user_limit`` answers, and the channel
fewer than ``channel_limit``, in the last ``window_s`` seconds. Only allowed questions count.
When refused, the decision says which limit was hit and how long until a slot frees up.

Limits live in process memory: with several shard processes a channel always belongs to one shard
(its guild's), so channel limits are exact; a user active in guilds on different shards gets the
user limit per process. That is the intended trade-off: no database round trip before deferring.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Literal

Clock = Callable[[], float]


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    retry_after: float = 0.0  # seconds until the question would be allowed
    scope: Literal["user", "channel"] | None = None  # which limit refused it


ALLOWED = RateDecision(True)


class SlidingWindow:
    """At most ``limit`` events per key in any ``window`` seconds."""

    def __init__(self, limit: int, window: float, clock: Clock = time.monotonic) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("limit must be >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self._clock = clock
        self._events: dict[Hashable, deque[float]] = {}
        self._checks = 0

    def _prune(self, key: Hashable, now: float) -> deque[float] | None:
        q = self._events.get(key)
        if q is None:
            return None
        while q and q[0] <= now - self.window:
            q.popleft()
        if not q:
            del self._events[key]
            return None
        return q

    def retry_after(self, key: Hashable) -> float:
        """0 when an event for ``key`` is allowed now, else seconds until it will be."""
        now = self._clock()
        q = self._prune(key, now)
        if q is None or len(q) < self.limit:
            return 0.0
        # the oldest event that must expire for a slot to open
        return max(0.0, q[len(q) - self.limit] + self.window - now)

    def record(self, key: Hashable) -> None:
        now = self._clock()
        self._events.setdefault(key, deque()).append(now)
        self._checks += 1
        if self._checks % 1024 == 0:
            self.sweep()

    def sweep(self) -> None:
        """Forget keys whose events have all expired (bounded memory)."""
        now = self._clock()
        for key in list(self._events):
            self._prune(key, now)

    def __len__(self) -> int:
        return len(self._events)


class AnswerRateLimiter:
    """The user and channel windows together; ``check`` records the question when it is allowed."""

    def __init__(
        self, *, user_limit: int, channel_limit: int, window_s: float, clock: Clock = time.monotonic
    ):
        self.users = SlidingWindow(user_limit, window_s, clock)
        self.channels = SlidingWindow(channel_limit, window_s, clock)

    @classmethod
    def from_settings(cls, settings, clock: Clock = time.monotonic) -> AnswerRateLimiter:
        return cls(
            user_limit=settings.user_rate,
            channel_limit=settings.channel_rate,
            window_s=settings.rate_window_s,
            clock=clock,
        )

    def check(self, user_id: int, channel_id: int | None) -> RateDecision:
        wait_user = self.users.retry_after(user_id)
        wait_channel = self.channels.retry_after(channel_id) if channel_id is not None else 0.0
        if wait_user > 0 or wait_channel > 0:
            if wait_user >= wait_channel:
                return RateDecision(False, wait_user, "user")
            return RateDecision(False, wait_channel, "channel")
        self.users.record(user_id)
        if channel_id is not None:
            self.channels.record(channel_id)
        return ALLOWED


def format_wait(seconds: float) -> str:
    """'1 second', '12 seconds', '2 minutes', '1 minute 5 seconds' (rounded up)."""
    s = max(1, math.ceil(seconds))
    if s < 60:
        return f"{s} second{'s' if s != 1 else ''}"
    m, s = divmod(s, 60)
    text = f"{m} minute{'s' if m != 1 else ''}"
    return text + (f" {s} second{'s' if s != 1 else ''}" if s else "")


def friendly_message(decision: RateDecision) -> str:
    """What the student reads when a limit refuses their question."""
    wait = format_wait(decision.retry_after)
    if decision.scope == "channel":
        return f"⏳ This channel has asked a lot of questions just now. Please try again in {wait}."
    return f"⏳ You're asking faster than I can keep up. Please try again in {wait}."
