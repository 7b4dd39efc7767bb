"""The agent pool's lease: one run at a time, a lapsed run taken over, no loss."""

from __future__ import annotations

import sys
import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import delete, select, update

from config.settings import Settings
from hookline.db import session_scope
from hookline.models import (
    Callback,
    Conversation,
    ConversationTransition,
    Turn,
    utcnow,
)
from hookline.runtime import CommandRuntime
from tasks.agent import (
    MAX_RUN_ATTEMPTS,
    claim_run,
    find_stalled,
    renew_lease,
    run_conversation,
)
from workers.celery_app import SWEEP_TASK, create_celery

ECHO = CommandRuntime([sys.executable, "-c", "print('ran once')"])
_created: list[uuid.UUID] = []


@pytest.fixture(autouse=True)
def _forget_conversations(database_url: str):
    """Delete this test's conversations, so no later sweep finds them stalled."""
    yield
    with session_scope(database_url) as session:
        for table in (Callback, ConversationTransition, Turn):
            session.execute(delete(table).where(table.conversation_id.in_(_created)))
        session.execute(delete(Conversation).where(Conversation.id.in_(_created)))
    _created.clear()


def new_conversation(database_url: str, **values: object) -> uuid.UUID:
    delivery_id = str(uuid.uuid4())
    conversation = Conversation(
        delivery_id=delivery_id,
        kind="issue",
        repository="octo-user/Hello-World",
        number=1,
        installation_id=4001,
        author="octo-user",
        reaction_path="/repos/octo-user/Hello-World/issues/1/reactions",
        reply_path="/repos/octo-user/Hello-World/issues/1/comments",
        instructions="The request:\nsay hello",
        **values,
    )
    conversation.turns.append(
        Turn(
            number=1,
            delivery_id=delivery_id,
            kind="issue",
            author="octo-user",
            request=conversation.instructions,
            reply_path=conversation.reply_path,
            reaction_path=conversation.reaction_path,
        )
    )
    with session_scope(database_url) as session:
        session.add(conversation)
    _created.append(conversation.id)
    return conversation.id


def load(database_url: str, conversation_id: uuid.UUID) -> Conversation:
    with session_scope(database_url) as session:
        return session.get_one(Conversation, conversation_id)


def test_a_run_is_claimed_by_one_worker_only(database_url: str) -> None:
    conversation_id = new_conversation(database_url)

    assert claim_run(database_url, conversation_id, lease=60) == 1
    assert claim_run(database_url, conversation_id, lease=60) is None
    assert load(database_url, conversation_id).status == "running"


def test_a_lapsed_lease_is_taken_over(database_url: str) -> None:
    conversation_id = new_conversation(database_url)
    claim_run(database_url, conversation_id, lease=0)
    time.sleep(0.01)

    assert claim_run(database_url, conversation_id, lease=60) == 1
    assert load(database_url, conversation_id).run_attempts == 2


def test_renewing_keeps_the_lease_from_lapsing(database_url: str) -> None:
    conversation_id = new_conversation(database_url)
    claim_run(database_url, conversation_id, lease=0)
    renew_lease(database_url, conversation_id, lease=60)

    assert claim_run(database_url, conversation_id, lease=60) is None


def test_finished_run_stores_result_and_owes_one_callback(
    database_url: str, settings: Settings
) -> None:
    conversation_id = new_conversation(database_url)
    event = run_conversation(settings, conversation_id, "d-1", ECHO)
    again = run_conversation(settings, conversation_id, "d-1", ECHO)

    conversation = load(database_url, conversation_id)
    assert (event, again) == ("finished", None)
    assert conversation.result == "ran once"
    assert conversation.lease_expires_at is None
    with session_scope(database_url) as session:
        callbacks = session.scalars(
            select(Callback).where(Callback.conversation_id == conversation_id)
        ).all()
    assert [(c.event, c.status) for c in callbacks] == [("finished", "pending")]


def test_a_run_interrupted_too_often_ends_in_error(
    database_url: str, settings: Settings
) -> None:
    conversation_id = new_conversation(database_url, run_attempts=MAX_RUN_ATTEMPTS)

    assert run_conversation(settings, conversation_id, "d-2", ECHO) == "error"
    conversation = load(database_url, conversation_id)
    assert "interrupted" in conversation.error
    assert conversation.result is None


def test_sweep_finds_lapsed_and_unclaimed_runs_only(
    database_url: str, settings: Settings
) -> None:
    lapsed = new_conversation(
        database_url,
        status="running",
        lease_expires_at=utcnow() - timedelta(seconds=1),
    )
    alive = new_conversation(
        database_url,
        status="running",
        lease_expires_at=utcnow() + timedelta(seconds=60),
    )
    old_queued = new_conversation(database_url)
    with session_scope(database_url) as session:
        session.execute(
            update(Conversation)
            .where(Conversation.id == old_queued)
            .values(updated_at=utcnow() - timedelta(hours=1))
        )
    fresh_queued = new_conversation(database_url)

    runs, _ = find_stalled(settings)

    found = {conversation_id for conversation_id, _ in runs}
    assert {lapsed, old_queued} <= found
    assert not {alive, fresh_queued} & found


@pytest.mark.usefixtures("stack")
def test_run_whose_worker_died_is_finished_after_the_sweep(running, settings) -> None:
    # A run left "running" with a lapsed lease is what a killed agent worker leaves.
    conversation_id = new_conversation(
        settings.DATABASE_URL,
        status="running",
        lease_expires_at=utcnow() - timedelta(seconds=1),
    )

    create_celery(settings).send_task(SWEEP_TASK)

    assert running.fake.wait_for(lambda fake: fake.comments(), timeout=30)
    time.sleep(0.5)
    (comment,) = running.fake.comments()
    assert comment["path"] == "/repos/octo-user/Hello-World/issues/1/comments"
    assert f"hookline:callback={conversation_id}/1/finished" in comment["body"]
    assert load(settings.DATABASE_URL, conversation_id).status == "finished"
