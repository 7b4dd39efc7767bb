"""Pin the OpenHands runtime's behaviour against the loopback fake OpenHands server."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from config.settings import ConfigError, Settings
from hookline.fake_openhands import FakeOpenHands
from hookline.openhands import OpenHandsRuntime
from hookline.runtime import (
    STOPPED_ERROR,
    AgentOutcome,
    AgentRequest,
    AgentStatus,
    Message,
    Purpose,
    runtime_for,
)

API_KEY = "test-openhands-key"
CONTEXT = {"HOOKLINE_REPOSITORY": "octo-org/hello-world", "HOOKLINE_BRANCH": "fix-1"}
CONVERSATIONS = "/api/conversations"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenHands]:
    with FakeOpenHands(API_KEY, agent_delay=0.05) as running:
        yield running


@pytest.fixture
def fake(server: FakeOpenHands) -> Iterator[FakeOpenHands]:
    server.reset()
    server.agent_delay = 0.05
    yield server
    server.reset()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    # Ignore proxy settings from the environment so every call stays on loopback.
    session = requests.Session()
    session.trust_env = False
    yield session
    session.close()


@pytest.fixture
def make_runtime(
    fake: FakeOpenHands, http: requests.Session
) -> Callable[..., OpenHandsRuntime]:
    def make(api_key: str = API_KEY, request_timeout: float = 2.0) -> OpenHandsRuntime:
        return OpenHandsRuntime(
            fake.url,
            api_key,
            poll_interval=0.02,
            poll_max_interval=0.1,
            session=http,
            request_timeout=request_timeout,
        )

    return make


def _request(
    *texts: str,
    runtime_ref: str | None = None,
    timeout: float = 5.0,
    purpose: Purpose = Purpose.TURN,
    on_ref: Callable[[str], None] | None = None,
) -> AgentRequest:
    roles = ["user" if index % 2 == 0 else "agent" for index in range(len(texts))]
    return AgentRequest(
        conversation_id="c-1",
        messages=tuple(
            Message(role, text) for role, text in zip(roles, texts, strict=True)
        ),
        context=CONTEXT,
        timeout=timeout,
        runtime_ref=runtime_ref,
        purpose=purpose,
        on_ref=on_ref,
    )


def _run(
    runtime: OpenHandsRuntime,
    request: AgentRequest,
    heartbeat: Callable[[], bool] = lambda: True,
    heartbeat_every: float = 0.05,
) -> AgentOutcome:
    return runtime.run(request, heartbeat, heartbeat_every)


def test_first_turn_creates_a_conversation_and_returns_the_agent_reply(
    fake: FakeOpenHands, make_runtime: Callable[..., OpenHandsRuntime]
) -> None:
    outcome = _run(make_runtime(), _request("Fix the README\nIt has typos."))

    assert outcome.status is AgentStatus.FINISHED
    assert outcome.output == "Done: Fix the README"
    [conversation] = fake.conversations()
    assert outcome.runtime_ref == conversation["conversation_id"]
    assert conversation["repository"] == "octo-org/hello-world"
    assert conversation["branch"] == "fix-1"
    [create] = fake.requests("POST")
    assert create.body == {
        "initial_user_msg": "Fix the README\nIt has typos.",
        "repository": "octo-org/hello-world",
        "git_provider": "github",
        "selected_branch": "fix-1",
    }
    assert create.headers["Authorization"] == f"Bearer {API_KEY}"


def test_question_then_follow_up_continue_the_same_remote_conversation(
    fake: FakeOpenHands, make_runtime: Callable[..., OpenHandsRuntime]
) -> None:
    runtime = make_runtime()
    first = _run(runtime, _request("Please ask me what you need"))

    assert first.status is AgentStatus.AWAITING_INPUT
    assert first.output.startswith("Question:")
    assert first.runtime_ref

    second = _run(
        runtime,
        _request(
            "Please ask me what you need",
            first.output,
            "Use the main branch",
            runtime_ref=first.runtime_ref,
        ),
    )

    assert second.status is AgentStatus.FINISHED
    assert second.output == "Done: Use the main branch"
    assert second.runtime_ref == first.runtime_ref
    [conversation] = fake.conversations()
    user_texts = [m["text"] for m in conversation["messages"] if m["role"] == "user"]
    assert user_texts == ["Please ask me what you need", "Use the main branch"]
    assert [r.path for r in fake.requests("POST")] == [
        CONVERSATIONS,
        f"{CONVERSATIONS}/{first.runtime_ref}/message",
    ]
    [message] = fake.requests("POST", "/message")
    assert message.body == {"message": "Use the main branch"}


def test_agent_failure_is_an_error_with_the_reason(
    make_runtime: Callable[..., OpenHandsRuntime],
) -> None:
    outcome = _run(make_runtime(), _request("This one will fail"))

    assert outcome.status is AgentStatus.ERROR
    assert (
        outcome.error == "the OpenHands agent failed: the fake agent gave up as asked"
    )
    assert outcome.runtime_ref


def test_on_ref_is_reported_once_before_any_polling(
    fake: FakeOpenHands, make_runtime: Callable[..., OpenHandsRuntime]
) -> None:
    reported: list[tuple[str, int]] = []

    def on_ref(ref: str) -> None:
        reported.append((ref, len(fake.requests("GET", "/events"))))

    outcome = _run(make_runtime(), _request("Tidy up", on_ref=on_ref))

    assert outcome.status is AgentStatus.FINISHED
    assert reported == [(outcome.runtime_ref, 0)]
    assert fake.requests("GET", "/events")


def test_heartbeat_saying_stop_stops_the_remote_conversation(
    fake: FakeOpenHands, make_runtime: Callable[..., OpenHandsRuntime]
) -> None:
    fake.agent_delay = 5.0
    beats: list[float] = []

    def heartbeat() -> bool:
        beats.append(time.monotonic())
        return False

    outcome = _run(make_runtime(), _request("Slow work"), heartbeat, 0.05)

    assert outcome == AgentOutcome(
        AgentStatus.ERROR, error=STOPPED_ERROR, runtime_ref=outcome.runtime_ref
    )
    assert len(beats) == 1
    [stop] = fake.requests("POST", "/stop")
    assert stop.path == f"{CONVERSATIONS}/{outcome.runtime_ref}/stop"
    [conversation] = fake.conversations()
    assert conversation["status"] == "STOPPED"
    assert conversation["agent_state"] == "stopped"


def test_a_turn_that_outlasts_its_timeout_is_an_error_and_stopped(
    fake: FakeOpenHands, make_runtime: Callable[..., OpenHandsRuntime]
) -> None:
    fake.agent_delay = 5.0
    started = time.monotonic()

    outcome = _run(make_runtime(), _request("Slow work", timeout=0.3))

    assert time.monotonic() - started < 2.0
    assert outcome.status is AgentStatus.ERROR
    assert outcome.error == "OpenHands agent timed out after 0.3 s"
    assert outcome.runtime_ref
    assert fake.conversations()[0]["status"] == "STOPPED"


def test_5xx_and_429_while_polling_are_retried_honouring_retry_after(
    fake: FakeOpenHands, make_runtime: Callable[..., OpenHandsRuntime]
) -> None:
    # Slow enough that the turn reads the conversation's status too.
    fake.agent_delay = 0.3
    fake.fail_next("GET", r"/events$", 503, times=2)
    fake.fail_next("GET", r"^/api/conversations/[0-9a-f]+$", 429, retry_after=1)

    outcome = _run(make_runtime(), _request("Fix the flaky test"))

    assert outcome.status is AgentStatus.FINISHED
    assert outcome.output == "Done: Fix the flaky test"
    events = fake.requests("GET", "/events")
    assert [r.status for r in events[:3]] == [503, 503, 200]
    status_reads = [r for r in fake.requests("GET") if not r.path.endswith("/events")]
    assert status_reads[0].status == 429
    waited = status_reads[1].received_at - status_reads[0].received_at
    assert waited >= 0.95


def test_a_poll_that_hangs_past_the_client_timeout_is_retried(
    fake: FakeOpenHands, make_runtime: Callable[..., OpenHandsRuntime]
) -> None:
    fake.fail_next("GET", r"/events$", 0, delay=1.0)

    outcome = _run(make_runtime(request_timeout=0.3), _request("Rename a variable"))

    assert outcome.status is AgentStatus.FINISHED
    assert outcome.output == "Done: Rename a variable"


def test_a_failed_send_is_retried_and_delivered_once(
    fake: FakeOpenHands, make_runtime: Callable[..., OpenHandsRuntime]
) -> None:
    runtime = make_runtime()
    first = _run(runtime, _request("Please ask first"))
    fake.fail_next("POST", r"/message$", 502)

    second = _run(
        runtime,
        _request(
            "Please ask first", first.output, "Go on", runtime_ref=first.runtime_ref
        ),
    )

    assert second.status is AgentStatus.FINISHED
    assert [r.status for r in fake.requests("POST", "/message")] == [502, 200]
    user_texts = [
        m["text"] for m in fake.conversations()[0]["messages"] if m["role"] == "user"
    ]
    assert user_texts == ["Please ask first", "Go on"]


def test_a_follow_up_to_a_stopped_conversation_starts_it_first(
    fake: FakeOpenHands, make_runtime: Callable[..., OpenHandsRuntime]
) -> None:
    runtime = make_runtime()
    first = _run(runtime, _request("Please ask first"))
    assert first.runtime_ref
    runtime.stop(first.runtime_ref)

    second = _run(
        runtime,
        _request(
            "Please ask first", first.output, "Carry on", runtime_ref=first.runtime_ref
        ),
    )

    assert second.status is AgentStatus.FINISHED
    assert second.output == "Done: Carry on"
    paths = [r.path.rsplit("/", 1)[-1] for r in fake.requests("POST")]
    assert paths[-2:] == ["start", "message"]


def test_a_taken_over_turn_does_not_send_its_message_twice(
    fake: FakeOpenHands, make_runtime: Callable[..., OpenHandsRuntime], http
) -> None:
    # The crashed worker created the conversation and reported its id, then died.
    # The agent is slow enough that the new worker finds the message unanswered.
    fake.agent_delay = 0.8
    created = http.post(
        f"{fake.url}{CONVERSATIONS}",
        json={"initial_user_msg": "Update the docs"},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=5,
    ).json()

    outcome = _run(
        make_runtime(),
        _request("Update the docs", runtime_ref=created["conversation_id"]),
    )

    assert outcome.status is AgentStatus.FINISHED
    assert outcome.output == "Done: Update the docs"
    assert fake.requests("POST", "/message") == []


def test_a_summary_returns_the_agent_reply_and_leaves_its_state(
    fake: FakeOpenHands, make_runtime: Callable[..., OpenHandsRuntime]
) -> None:
    runtime = make_runtime()
    first = _run(runtime, _request("Fix the build"))

    summary = _run(
        runtime,
        _request(
            "Fix the build",
            first.output,
            "Summarize your progress",
            runtime_ref=first.runtime_ref,
            purpose=Purpose.SUMMARY,
        ),
    )

    assert summary.status is AgentStatus.FINISHED
    assert summary.output.startswith("Summary: 1 request(s) so far, the latest: Fix")
    assert fake.conversations()[0]["agent_state"] == "finished"


def test_a_wrong_api_key_is_an_error_naming_401(
    fake: FakeOpenHands, make_runtime: Callable[..., OpenHandsRuntime]
) -> None:
    reported: list[str] = []

    outcome = _run(
        make_runtime(api_key="not-the-key"),
        _request("Fix it", on_ref=reported.append),
    )

    assert outcome.status is AgentStatus.ERROR
    assert "401" in outcome.error
    assert "OPENHANDS_API_KEY" in outcome.error
    assert outcome.runtime_ref is None
    assert reported == []
    assert fake.conversations() == []


def test_an_unknown_runtime_ref_is_an_error(
    make_runtime: Callable[..., OpenHandsRuntime],
) -> None:
    outcome = _run(make_runtime(), _request("Hello", runtime_ref="f" * 32))

    assert outcome.status is AgentStatus.ERROR
    assert outcome.error == f"OpenHands has no conversation {'f' * 32}"
    assert outcome.runtime_ref == "f" * 32


def test_stop_tolerates_an_unknown_conversation(
    fake: FakeOpenHands, make_runtime: Callable[..., OpenHandsRuntime]
) -> None:
    make_runtime().stop("0" * 32)

    [stop] = fake.requests("POST", "/stop")
    assert stop.status == 404


def test_a_refused_stop_is_logged_not_raised(
    fake: FakeOpenHands,
    make_runtime: Callable[..., OpenHandsRuntime],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The stop task posts its callback after stop(), whatever OpenHands says.
    fake.fail_next("POST", r"/stop$", 403)

    with caplog.at_level(logging.WARNING, logger="hookline.openhands"):
        make_runtime().stop("0" * 32)

    [failed] = [r for r in caplog.records if r.getMessage() == "openhands.stop_failed"]
    assert "403" in failed.error


def test_events_are_read_page_by_page(
    fake: FakeOpenHands,
    make_runtime: Callable[..., OpenHandsRuntime],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("hookline.openhands.EVENTS_PAGE", 2)

    outcome = _run(make_runtime(), _request("Bump the version"))

    assert outcome.output == "Done: Bump the version"
    starts = [int(r.query["start_id"]) for r in fake.requests("GET", "/events")]
    assert {r.query["limit"] for r in fake.requests("GET", "/events")} == {"2"}
    assert starts == sorted(starts)
    # The first read follows `has_more` from event 0 to event 2.
    assert starts[:2] == [0, 2]


def test_the_fake_is_steered_over_http(
    fake: FakeOpenHands, http: requests.Session
) -> None:
    answered = http.post(
        f"{fake.url}/_fake/fail",
        json={"method": "GET", "path_regex": "/events$", "status": 503},
        timeout=5,
    )
    assert answered.status_code == 204
    auth = {"Authorization": f"Bearer {API_KEY}"}
    created = http.post(
        f"{fake.url}{CONVERSATIONS}",
        json={"initial_user_msg": "Hi"},
        headers=auth,
        timeout=5,
    ).json()
    events_url = f"{fake.url}{CONVERSATIONS}/{created['conversation_id']}/events"

    assert http.get(events_url, headers=auth, timeout=5).status_code == 503
    assert http.get(events_url, headers=auth, timeout=5).status_code == 200
    listed = http.get(f"{fake.url}/_fake/conversations", timeout=5).json()
    assert listed[0]["messages"][0] == {"role": "user", "text": "Hi"}
    recorded = http.get(f"{fake.url}/_fake/requests?method=GET", timeout=5).json()
    assert [r["status"] for r in recorded] == [503, 200]
    assert http.post(f"{fake.url}/_fake/reset", timeout=5).status_code == 204
    assert fake.conversations() == []


def test_runtime_for_builds_the_openhands_runtime_from_settings() -> None:
    config = Settings(
        HOOKLINE_RUNTIME="openhands",
        OPENHANDS_URL="http://127.0.0.1:9/",
        OPENHANDS_API_KEY="k",
        OPENHANDS_POLL_INTERVAL=0.5,
        OPENHANDS_POLL_MAX_INTERVAL=7.0,
    )

    runtime = runtime_for(config)

    assert isinstance(runtime, OpenHandsRuntime)
    assert runtime.base_url == "http://127.0.0.1:9"
    assert (runtime.poll_interval, runtime.poll_max_interval) == (0.5, 7.0)


def test_runtime_for_refuses_openhands_without_a_url() -> None:
    with pytest.raises(ConfigError, match="OPENHANDS_URL"):
        runtime_for(Settings(HOOKLINE_RUNTIME="openhands", OPENHANDS_URL=""))
