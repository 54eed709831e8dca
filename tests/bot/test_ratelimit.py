"""Sliding-window answer limits with an injected clock."""

from __future__ import annotations

import pytest

from bot.ratelimit import AnswerRateLimiter, RateDecision, SlidingWindow, format_wait, friendly_message


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_window_allows_limit_then_says_when_a_slot_frees():
    clock = Clock()
    w = SlidingWindow(3, 60, clock)
    for dt in (0, 10, 20):
        clock.now += dt
        assert w.retry_after("u") == 0
        w.record("u")
    # events at 1000, 1010, 1030: the next slot opens when the first expires (1060)
    assert w.retry_after("u") == pytest.approx(30)
    clock.now = 1059.9
    assert w.retry_after("u") == pytest.approx(0.1)
    clock.now = 1060.0
    assert w.retry_after("u") == 0
    assert w.retry_after("someone else") == 0


def test_window_is_sliding_not_fixed():
    clock = Clock()
    w = SlidingWindow(2, 10, clock)
    w.record("k")
    clock.now += 9
    w.record("k")
    clock.now += 2  # first event expired, second still inside
    assert w.retry_after("k") == 0
    w.record("k")
    assert w.retry_after("k") == pytest.approx(8)  # the event at +9 expires at +19; now is +11


def test_sweep_forgets_expired_keys():
    clock = Clock()
    w = SlidingWindow(1, 5, clock)
    for k in range(100):
        w.record(k)
    assert len(w) == 100
    clock.now += 6
    w.sweep()
    assert len(w) == 0


def test_invalid_configuration():
    with pytest.raises(ValueError):
        SlidingWindow(0, 10)
    with pytest.raises(ValueError):
        SlidingWindow(1, 0)


def test_user_and_channel_limits_and_only_allowed_questions_count():
    clock = Clock()
    rl = AnswerRateLimiter(user_limit=2, channel_limit=3, window_s=60, clock=clock)
    assert rl.check(1, 100).allowed
    assert rl.check(1, 100).allowed
    refused = rl.check(1, 100)
    assert refused == RateDecision(False, pytest.approx(60), "user")
    assert rl.check(2, 100).allowed  # the refused question did not use a channel slot
    channel_full = rl.check(3, 100)
    assert not channel_full.allowed and channel_full.scope == "channel"
    assert rl.check(3, 200).allowed  # another channel
    clock.now += 60
    assert rl.check(1, 100).allowed
    assert rl.check(4, None).allowed  # no channel (never limited by channel)


def test_the_longer_wait_is_reported():
    clock = Clock()
    rl = AnswerRateLimiter(user_limit=1, channel_limit=1, window_s=60, clock=clock)
    assert rl.check(1, 100).allowed
    clock.now += 30
    assert rl.check(2, 200).allowed
    clock.now += 5
    d = rl.check(2, 100)  # user 2 waits 55 s, channel 100 waits 25 s
    assert (d.scope, round(d.retry_after)) == ("user", 55)


def test_from_settings():
    class S:
        user_rate, channel_rate, rate_window_s = 5, 20, 60.0

    rl = AnswerRateLimiter.from_settings(S())
    assert (rl.users.limit, rl.channels.limit, rl.users.window) == (5, 20, 60.0)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.2, "1 second"),
        (1, "1 second"),
        (12.1, "13 seconds"),
        (60, "1 minute"),
        (65, "1 minute 5 seconds"),
        (120, "2 minutes"),
        (121, "2 minutes 1 second"),
    ],
)
def test_format_wait(seconds, text):
    assert format_wait(seconds) == text


def test_friendly_messages_name_the_wait():
    assert "try again in 12 seconds" in friendly_message(RateDecision(False, 11.5, "user"))
    assert friendly_message(RateDecision(False, 11.5, "user")).startswith("⏳ You're asking")
    assert "This channel" in friendly_message(RateDecision(False, 90, "channel"))
    assert "1 minute 30 seconds" in friendly_message(RateDecision(False, 90, "channel"))
