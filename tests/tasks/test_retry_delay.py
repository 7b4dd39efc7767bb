"""Pin the retry backoff: doubling, jittered within one base, bounded."""

from __future__ import annotations

import pytest

from config.settings import Settings, load_settings
from tasks import common
from tasks.common import retry_delay

SAMPLES = 200


@pytest.fixture
def config() -> Settings:
    return load_settings(
        environ={},
        overrides={"HOOKLINE_RETRY_BASE": 1.0, "HOOKLINE_RETRY_MAX_DELAY": 300.0},
    )


@pytest.fixture
def no_jitter(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float]]:
    """Make the jitter zero and record the range it was drawn from."""
    drawn: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        drawn.append((low, high))
        return 0.0

    monkeypatch.setattr(common.random, "uniform", uniform)
    return drawn


def test_delay_doubles_with_each_retry(config: Settings, no_jitter: list) -> None:
    delays = [retry_delay(retries, None, config) for retries in range(4)]

    assert delays == [1.0, 2.0, 4.0, 8.0]


def test_jitter_is_drawn_from_zero_to_one_base(
    config: Settings, no_jitter: list
) -> None:
    retry_delay(2, None, config)

    assert no_jitter == [(0, config.HOOKLINE_RETRY_BASE)]


@pytest.mark.parametrize("retries", [0, 1, 2, 3])
def test_jittered_delay_stays_within_one_base(config: Settings, retries: int) -> None:
    floor = 2**retries
    delays = [retry_delay(retries, None, config) for _ in range(SAMPLES)]

    assert all(floor <= delay < floor + 1 for delay in delays)
    assert len(set(delays)) > 1


def test_base_scales_the_delay(no_jitter: list) -> None:
    config = load_settings(environ={}, overrides={"HOOKLINE_RETRY_BASE": 0.25})

    assert retry_delay(3, None, config) == 2.0


def test_larger_retry_after_is_honoured(config: Settings) -> None:
    assert retry_delay(0, 30.0, config) == 30.0


def test_smaller_retry_after_does_not_shorten_the_backoff(
    config: Settings, no_jitter: list
) -> None:
    assert retry_delay(3, 2.0, config) == 8.0


def test_delay_is_capped_at_max_delay(config: Settings) -> None:
    assert retry_delay(20, None, config) == 300.0


def test_retry_after_is_capped_at_max_delay(config: Settings) -> None:
    assert retry_delay(0, 3600.0, config) == 300.0
