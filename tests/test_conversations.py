"""A conversation's life end to end: questions, follow-ups, waiting turns, stop.

Real gunicorn, Celery pools, PostgreSQL and Redis, once with the command runner
(tests/agent.py) and once with the OpenHands runtime against its loopback fake;
both agents follow the same rules, and the fake GitHub records what was posted.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from sqlalchemy import select

from hookline.db import session_scope
from hookline.devtools import send_delivery
from hookline.models import Callback, Conversation, ConversationTransition, Turn
from tests.conftest import SECRET, Stack, fixture_bytes

REPOSITORY = "octo-user/Hello-World"
TIMEOUT = 30
_comment_ids = itertools.count(7_000_001)
_issue_numbers = itertools.count(501)


@dataclass(frozen=True)
class Agent:
    """How each runtime's test agent words its answers."""

    question: str
    summary: str
    error: str
    # A piece of the result of a turn, from the turn's number and request.
    finished: Callable[[int, str], str]


AGENTS = {
    "command": Agent(
        question="which option do you want? (turn 1)",
        summary="summary: 0 follow-ups so far, turn 1",
        error="agent exited with code 4",
        finished=lambda turn, _request: f"turn={turn}",
    ),
    "openhands": Agent(
        question="Question: what should I know before I start",
        summary="Summary: 1 request(s) so far",
        error="the fake agent gave up as asked",
        finished=lambda turn, request: f"Done: {request}" if turn > 1 else "Done: ",
    ),
}


@pytest.fixture(params=sorted(AGENTS))
def talk(request: pytest.FixtureRequest) -> Stack:
    """Return a cleared stack for each runtime in turn."""
    if request.param == "command":
        return request.getfixturevalue("running")
    return request.getfixturevalue("running_openhands")


@pytest.fixture
def agent(talk: Stack) -> Agent:
    return AGENTS[talk.settings.HOOKLINE_RUNTIME]


@pytest.fixture
def issue(talk: Stack) -> int:
    """Return an issue number of Hello-World that no other test talks on."""
    return next(_issue_numbers)


def say(stack: Stack, number: int, body: str) -> str:
    """Send a new comment on Hello-World #`number`, as GitHub would; return its id."""
    payload = json.loads(fixture_bytes("issue_comment.created.json"))
    payload["issue"]["number"] = number
    payload["comment"]["id"] = next(_comment_ids)
    payload["comment"]["body"] = body
    delivery_id = f"conversation-test-{payload['comment']['id']}"
    response = send_delivery(
        stack.gateway_url,
        SECRET,
        "issue_comment",
        json.dumps(payload).encode(),
        delivery_id,
    )
    assert response.status_code == 202
    return delivery_id


def conversations(stack: Stack, number: int) -> list[Conversation]:
    with session_scope(stack.settings.DATABASE_URL) as session:
        return list(
            session.scalars(
                select(Conversation)
                .where(
                    Conversation.repository == REPOSITORY,
                    Conversation.number == number,
                )
                .order_by(Conversation.created_at)
            )
        )


def wait_for(what: str, check: Callable[[], object], timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def only_conversation(stack: Stack, number: int, status: str) -> Conversation:
    def check() -> Conversation | None:
        found = conversations(stack, number)
        return found[0] if len(found) == 1 and found[0].status == status else None

    return wait_for(f"one conversation {status}", check)


def callbacks_done(stack: Stack, conversation: Conversation, count: int) -> list:
    def check() -> list[Callback] | None:
        with session_scope(stack.settings.DATABASE_URL) as session:
            rows = list(
                session.scalars(
                    select(Callback)
                    .where(Callback.conversation_id == conversation.id)
                    .order_by(Callback.id)
                )
            )
        done = [row for row in rows if row.status != "pending"]
        return done if len(done) == count else None

    return wait_for(f"{count} callbacks done", check)


def turns_of(stack: Stack, conversation: Conversation) -> list[Turn]:
    with session_scope(stack.settings.DATABASE_URL) as session:
        return list(
            session.scalars(
                select(Turn)
                .where(Turn.conversation_id == conversation.id)
                .order_by(Turn.number)
            )
        )


def moves(stack: Stack, conversation: Conversation) -> list[tuple]:
    with session_scope(stack.settings.DATABASE_URL) as session:
        rows = session.scalars(
            select(ConversationTransition)
            .where(ConversationTransition.conversation_id == conversation.id)
            .order_by(ConversationTransition.id)
        )
        return [(row.from_status, row.to_status) for row in rows]


def test_a_question_is_posted_with_a_summary_and_the_answer_resumes_it(
    talk: Stack, issue: int, agent: Agent
) -> None:
    say(talk, issue, "@openhands ask please")
    asking = only_conversation(talk, issue, "awaiting_input")
    callbacks_done(talk, asking, 1)

    (question,) = talk.fake.comments()
    assert f"**I need your input:** {agent.question}" in (question["body"])
    # The summary prompt went to the runtime first, and its answer leads.
    assert question["body"].startswith(agent.summary)
    assert question["edits"] == 1
    assert [r["content"] for r in talk.fake.reactions()] == ["eyes"]

    say(talk, issue, "@openhands option B, thanks")
    finished = only_conversation(talk, issue, "finished")
    callbacks_done(talk, finished, 2)

    assert finished.id == asking.id
    first, second = turns_of(talk, finished)
    assert agent.question in first.reply
    assert second.request.startswith("@openhands option B, thanks")
    assert agent.finished(2, "@openhands option B, thanks") in second.reply
    comments = talk.fake.comments()
    assert len(comments) == 2
    assert comments[0]["body"] == question["body"]
    assert agent.finished(2, "@openhands option B, thanks") in comments[1]["body"]
    assert moves(talk, finished) == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "awaiting_input"),
        ("awaiting_input", "queued"),
        ("queued", "running"),
        ("running", "finished"),
    ]
    contents = [r["content"] for r in talk.fake.reactions()]
    assert contents == ["eyes", "eyes", "rocket"]


def test_a_mention_while_running_waits_its_turn_in_the_same_conversation(
    talk: Stack, issue: int, agent: Agent
) -> None:
    say(talk, issue, "@openhands sleep 3")
    only_conversation(talk, issue, "running")
    say(talk, issue, "@openhands also rename the flag")

    def waiting_comment() -> bool:
        return any("comes next" in c["body"] for c in talk.fake.comments())

    wait_for("the waiting turn's comment", waiting_comment)
    finished = only_conversation(talk, issue, "finished")
    callbacks_done(talk, finished, 2)

    turns = turns_of(talk, finished)
    assert [turn.number for turn in turns] == [1, 2]
    assert agent.finished(1, "") in turns[0].reply
    assert agent.finished(2, "@openhands also rename the flag") in turns[1].reply
    comments = talk.fake.comments()
    assert len(comments) == 2
    assert agent.finished(1, "") in comments[0]["body"]
    assert agent.finished(2, "@openhands also rename") in comments[1]["body"]
    assert moves(talk, finished) == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "queued"),
        ("queued", "running"),
        ("running", "finished"),
    ]


def test_stop_ends_a_running_agent_and_says_so(
    talk: Stack, issue: int, agent: Agent
) -> None:
    say(talk, issue, "@openhands sleep 30")
    only_conversation(talk, issue, "running")
    started = time.monotonic()
    say(talk, issue, "@openhands stop")

    stopped = only_conversation(talk, issue, "stopped")
    callbacks_done(talk, stopped, 1)
    # The agent's heartbeat (every lease / 3 = 2 s) sees the stop and kills it.
    wait_for(
        "the agent run to give up",
        lambda: any(r["message"] == "agent.superseded" for r in talk.log_records()),
        timeout=10,
    )
    assert time.monotonic() - started < 15

    working, notice = talk.fake.comments()
    assert working["body"].startswith("Stopped before this was finished.")
    assert notice["body"].startswith("Stopped (stopped by octo-user).")
    assert moves(talk, stopped) == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "stopped"),
    ]
    (callback,) = callbacks_done(talk, stopped, 1)
    assert callback.event == "stopped"
    assert "finished" not in {row["content"] for row in talk.fake.reactions()}


def test_stop_while_awaiting_input_keeps_the_question(
    talk: Stack, issue: int, agent: Agent
) -> None:
    say(talk, issue, "@openhands ask please")
    asking = only_conversation(talk, issue, "awaiting_input")
    callbacks_done(talk, asking, 1)
    say(talk, issue, "@OpenHands, stop!")

    stopped = only_conversation(talk, issue, "stopped")
    callbacks_done(talk, stopped, 2)
    question, notice = talk.fake.comments()
    assert agent.question in question["body"]
    assert notice["body"].startswith("Stopped (stopped by octo-user).")


def test_stop_with_nothing_open_only_reacts(
    talk: Stack, issue: int, agent: Agent
) -> None:
    say(talk, issue, "@openhands stop")

    wait_for(
        "a confused reaction",
        lambda: [r["content"] for r in talk.fake.reactions()] == ["eyes", "confused"],
    )
    time.sleep(0.5)
    assert talk.fake.comments() == []
    assert conversations(talk, issue) == []


def test_an_error_ends_the_conversation_and_a_new_mention_starts_another(
    talk: Stack, issue: int, agent: Agent
) -> None:
    say(talk, issue, "@openhands fail please")
    failed = only_conversation(talk, issue, "error")
    callbacks_done(talk, failed, 1)
    (notice,) = talk.fake.comments()
    assert "Mention @openhands again to retry" in notice["body"]
    assert agent.error in failed.error

    say(talk, issue, "@openhands try again")
    wait_for(
        "a second conversation to finish",
        lambda: [c.status for c in conversations(talk, issue)] == ["error", "finished"],
    )


def test_turns_left_waiting_by_an_error_say_they_were_not_answered(
    talk: Stack, issue: int
) -> None:
    say(talk, issue, "@openhands sleep 3 then fail please")
    only_conversation(talk, issue, "running")
    say(talk, issue, "@openhands and also this")
    wait_for(
        "the waiting turn's comment",
        lambda: any("comes next" in c["body"] for c in talk.fake.comments()),
    )

    failed = only_conversation(talk, issue, "error")
    callbacks_done(talk, failed, 1)
    wait_for(
        "the waiting comment to be closed",
        lambda: any("Not answered" in c["body"] for c in talk.fake.comments()),
    )
    notice, waiting = talk.fake.comments()
    assert "could not finish this request" in notice["body"]
    assert waiting["body"].startswith("Not answered: the conversation ended")
    assert [t.reply is None for t in turns_of(talk, failed)] == [False, True]


def test_stop_closes_the_running_turn_and_the_ones_waiting(
    talk: Stack, issue: int
) -> None:
    say(talk, issue, "@openhands sleep 30")
    only_conversation(talk, issue, "running")
    say(talk, issue, "@openhands and also this")
    wait_for(
        "the waiting turn's comment",
        lambda: any("comes next" in c["body"] for c in talk.fake.comments()),
    )
    say(talk, issue, "@openhands stop")

    stopped = only_conversation(talk, issue, "stopped")
    callbacks_done(talk, stopped, 1)
    wait_for(
        "both turns' comments to say they stopped",
        lambda: (
            sum(
                c["body"].startswith("Stopped before this was finished.")
                for c in talk.fake.comments()
            )
            == 2
        ),
    )
    assert len(talk.fake.comments()) == 3


def test_a_mark_pasted_by_someone_else_is_not_taken_for_the_apps_comment(
    running: Stack,
) -> None:
    issue = next(_issue_numbers)
    say(running, issue, "@openhands ask please")
    asking = only_conversation(running, issue, "awaiting_input")
    callbacks_done(running, asking, 1)
    # Another user pastes the mark turn 2's "working on it" comment will carry,
    # and GitHub's first answer to that comment's POST is lost (a 502).
    planted = running.fake.add_comment(
        REPOSITORY, issue, f"nice bot <!-- hookline:status={asking.id}/2 -->"
    )
    running.fake.fail_next("POST", rf"/issues/{issue}/comments$", 502)

    say(running, issue, "@openhands option B")
    finished = only_conversation(running, issue, "finished")
    callbacks_done(running, finished, 2)

    _, second = turns_of(running, finished)
    assert second.status_comment_id != planted["id"]
    answer = [c for c in running.fake.comments() if c["id"] == second.status_comment_id]
    assert "test agent finished" in answer[0]["body"]
    assert all(c["id"] != planted["id"] for c in running.fake.comments())
    assert not running.fake.requests("PATCH", f"/issues/comments/{planted['id']}")
