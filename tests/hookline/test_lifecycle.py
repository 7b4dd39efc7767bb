"""Which state changes a conversation may make."""

from __future__ import annotations

import pytest

from hookline.lifecycle import ALLOWED, IllegalTransition, check
from hookline.models import ConversationStatus as S

TERMINAL = [S.FINISHED, S.ERROR, S.STOPPED]


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (None, S.QUEUED),
        (S.QUEUED, S.RUNNING),
        (S.RUNNING, S.RUNNING),
        (S.RUNNING, S.AWAITING_INPUT),
        (S.AWAITING_INPUT, S.QUEUED),
        (S.RUNNING, S.QUEUED),
        (S.RUNNING, S.FINISHED),
        (S.RUNNING, S.ERROR),
        (S.AWAITING_INPUT, S.STOPPED),
    ],
)
def test_allowed_transitions_pass(current, target) -> None:
    check(current, target)


@pytest.mark.parametrize("terminal", TERMINAL)
@pytest.mark.parametrize("target", list(S))
def test_nothing_leaves_a_terminal_state(terminal, target) -> None:
    with pytest.raises(IllegalTransition, match=f"from {terminal} to {target}"):
        check(terminal, target)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (None, S.RUNNING),
        (S.QUEUED, S.FINISHED),
        (S.QUEUED, S.AWAITING_INPUT),
        # An answer is queued first, so a run always starts from queued.
        (S.AWAITING_INPUT, S.RUNNING),
        (S.AWAITING_INPUT, S.FINISHED),
    ],
)
def test_skipping_a_step_is_refused(current, target) -> None:
    with pytest.raises(IllegalTransition):
        check(current, target)


def test_every_state_has_a_rule() -> None:
    assert set(ALLOWED) == {None, *S}
