"""Run conversation turns on an OpenHands server through its REST API.

It speaks OpenHands' conversation API under /api/conversations (the one the
Cloud API guide shows with `initial_user_msg`), and uses these endpoints:

- `POST /api/conversations` with `initial_user_msg`, `repository`,
  `selected_branch` and `git_provider`: start a conversation; the answer names
  its `conversation_id`.
- `GET /api/conversations/{id}`: the conversation's `status` (`STARTING`,
  `RUNNING`, `STOPPED`, ...); the body is `null` when the server has no such id.
- `POST /api/conversations/{id}/start`: bring a stopped conversation back, so a
  follow-up can reach its agent.
- `GET /api/conversations/{id}/events` with `start_id`, `limit` (at most 100)
  and `reverse`: events by id, and `has_more`. The agent's state is the
  `extras.agent_state` of `agent_state_changed` observations; its replies are
  `message` and `finish` actions whose `source` is `agent`.
- `POST /api/conversations/{id}/message` with `message`: a follow-up.
- `POST /api/conversations/{id}/stop`: stop the agent.

Calls carry `Authorization: Bearer <OPENHANDS_API_KEY>`, or no credentials when
the key is empty (a local server without auth). Field names come from
All-Hands-AI/OpenHands: openhands/server/routes/manage_conversations.py,
openhands/server/routes/conversation.py, openhands/events/serialization/event.py
and openhands/core/schema/agent.py.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import quote

import requests
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
)

from hookline.runtime import (
    MAX_RESULT_CHARS,
    STOPPED_ERROR,
    AgentOutcome,
    AgentRequest,
    AgentStatus,
    Purpose,
)

log = logging.getLogger(__name__)

DEFAULT_REQUEST_TIMEOUT = 15.0
CONNECT_TIMEOUT = 5.0
# The events endpoint refuses a larger page.
EVENTS_PAGE = 100
# Conversation statuses in which the agent loop is up and takes messages.
LIVE_STATUSES = frozenset({"STARTING", "RUNNING"})
# Agent states (openhands/core/schema/agent.py) that end a turn with a reply.
ANSWERED_STATES = {
    "awaiting_user_input": AgentStatus.AWAITING_INPUT,
    "finished": AgentStatus.FINISHED,
}
# Agent states that end a turn without one, and what the user is told.
FAILED_STATES = {
    "error": "the OpenHands agent failed",
    "stopped": "the agent was stopped in OpenHands",
    "rejected": "the OpenHands agent rejected the task",
    "paused": "the agent was paused in OpenHands",
    "awaiting_user_confirmation": (
        "the OpenHands agent waits for a person to confirm an action, which "
        "Hookline cannot do; turn confirmation mode off for Hookline's account"
    ),
}


class OpenHandsError(RuntimeError):
    """OpenHands refused a call, answered nonsense, or could not be reached."""


class _Refused(OpenHandsError):
    """OpenHands answered a 4xx other than 429: asking again will not help."""

    def __init__(self, status: int, method: str, path: str) -> None:
        try:
            phrase = f" {HTTPStatus(status).phrase}"
        except ValueError:
            phrase = ""
        message = f"OpenHands answered {status}{phrase} to {method} {path}"
        if status in (401, 403):
            message += "; check OPENHANDS_API_KEY"
        super().__init__(message)
        self.status = status


class _Transient(Exception):
    """A failure worth another try: no connection, no answer, 5xx or 429."""

    def __init__(self, summary: str, retry_after: float | None = None) -> None:
        super().__init__(summary)
        self.retry_after = retry_after


class _Stopped(Exception):
    """The heartbeat said the conversation is no longer this turn's."""


class _OutOfTime(Exception):
    """The turn's deadline passed."""


@dataclass
class _Clock:
    """A turn's deadline and heartbeat: every wait of the turn goes through it."""

    deadline: float
    heartbeat: Callable[[], bool]
    heartbeat_every: float
    last_beat: float = field(default_factory=time.monotonic)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def sleep(self, seconds: float) -> None:
        """Wait, beating whenever a heartbeat is due; raise _Stopped if told to."""
        until = min(time.monotonic() + seconds, self.deadline)
        while True:
            now = time.monotonic()
            if now - self.last_beat >= self.heartbeat_every:
                self.last_beat = now
                if not self.heartbeat():
                    raise _Stopped
            if now >= until:
                return
            time.sleep(min(until, self.last_beat + self.heartbeat_every) - now)


@dataclass
class _TurnEvents:
    """What the events after this turn's message say: the agent's state and reply.

    Events before the turn's own user message are skipped, so a state left over
    from an earlier turn (say `awaiting_user_input`) never ends this one.
    """

    next_id: int
    asked: bool = False
    state: str = ""
    reason: str = ""
    reply: str = ""

    def add(self, event: Mapping[str, Any]) -> None:
        source = event.get("source")
        if source == "user" and event.get("action") == "message":
            self.asked = True
            return
        if not self.asked:
            return
        if source == "agent" and event.get("action") in ("message", "finish"):
            self.reply = _reply_text(event) or self.reply
        elif event.get("observation") == "agent_state_changed":
            extras = event.get("extras") or {}
            self.state = str(extras.get("agent_state") or "")
            self.reason = str(extras.get("reason") or "")

    def outcome(self, purpose: Purpose) -> AgentOutcome | None:
        """Return how the turn ended, or None while the agent is still at it."""
        if self.state in FAILED_STATES:
            error = FAILED_STATES[self.state]
            return AgentOutcome(
                AgentStatus.ERROR,
                error=f"{error}: {self.reason}" if self.reason else error,
            )
        # A summary is an aside: its first reply ends it, whatever the agent's
        # state, since a summary of a running task leaves the task running.
        if purpose is Purpose.SUMMARY:
            if self.reply:
                return AgentOutcome(AgentStatus.FINISHED, output=_clip(self.reply))
            return None
        if self.state in ANSWERED_STATES:
            status = ANSWERED_STATES[self.state]
            fallback = (
                "(the agent finished without output)"
                if status is AgentStatus.FINISHED
                else "(the agent asks for input without saying what)"
            )
            return AgentOutcome(status, output=_clip(self.reply) or fallback)
        return None


def _reply_text(event: Mapping[str, Any]) -> str:
    # A `finish` action carries its text as `final_thought` (older servers:
    # `thought`); a `message` action as `content`. `message` is the server's own
    # one-line rendering, the last resort.
    args = event.get("args") or {}
    for key in ("content", "final_thought", "thought"):
        value = args.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    message = event.get("message")
    return message.strip() if isinstance(message, str) else ""


def _clip(text: str) -> str:
    if len(text) <= MAX_RESULT_CHARS:
        return text
    return text[:MAX_RESULT_CHARS] + "\n\n… (output truncated)"


def _retry_after(response: requests.Response) -> float | None:
    """Return the wait a Retry-After header asks for, in seconds, if it has one."""
    raw = response.headers.get("Retry-After")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class OpenHandsRuntime:
    """Hand each turn to a conversation on an OpenHands server and wait for it.

    The first turn starts a remote conversation; its id is the turn's
    `runtime_ref`, and later turns send their message to that conversation.
    Status is polled with exponential backoff from `poll_interval` to
    `poll_max_interval`. HTTP trouble never escapes `run`: a transient failure
    is retried until the turn's deadline, anything else is an ERROR outcome.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        poll_interval: float,
        poll_max_interval: float,
        session: requests.Session | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.poll_interval = max(poll_interval, 0.01)
        self.poll_max_interval = max(poll_max_interval, self.poll_interval)
        # A hung call holds the heartbeat back this long at most.
        self.request_timeout = request_timeout
        self.session = session if session is not None else requests.Session()
        self._headers = {"Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    # The protocol

    def run(
        self,
        request: AgentRequest,
        heartbeat: Callable[[], bool],
        heartbeat_every: float,
    ) -> AgentOutcome:
        """Send the request's last message to OpenHands and wait for the agent."""
        clock = _Clock(
            deadline=time.monotonic() + request.timeout,
            heartbeat=heartbeat,
            heartbeat_every=max(heartbeat_every, 0.01),
        )
        ref = request.runtime_ref
        fields = {"conversation": request.conversation_id, "openhands": ref}

        if not request.messages:
            return AgentOutcome(
                AgentStatus.ERROR, error="the turn has no message", runtime_ref=ref
            )
        if ref is None and request.purpose is Purpose.SUMMARY:
            return AgentOutcome(
                AgentStatus.ERROR, error="there is no OpenHands conversation to sum up"
            )

        text = request.messages[-1].text
        try:
            if ref is None:
                ref = self._create(clock, text, request.context)
                fields["openhands"] = ref
                log.info("openhands.created", extra=fields)
                # Reported before any wait, so a turn taken over after a crash
                # finds the conversation instead of starting another.
                if request.on_ref is not None:
                    request.on_ref(ref)
                cursor = 0
            else:
                cursor = self._send(clock, ref, text)
            outcome = self._await_answer(clock, ref, cursor, request.purpose)

        except _Stopped:
            log.info("openhands.stopped_by_heartbeat", extra=fields)
            self._stop_quietly(ref)
            return AgentOutcome(AgentStatus.ERROR, error=STOPPED_ERROR, runtime_ref=ref)

        except (_OutOfTime, _Transient) as exc:
            log.warning(
                "openhands.timed_out", extra={**fields, "last_failure": str(exc)}
            )
            self._stop_quietly(ref)
            error = f"OpenHands agent timed out after {request.timeout:g} s"
            if isinstance(exc, _Transient):
                error += f" (the last call: {exc})"
            return AgentOutcome(AgentStatus.ERROR, error=error, runtime_ref=ref)

        except OpenHandsError as exc:
            log.warning("openhands.refused", extra={**fields, "error": str(exc)})
            return AgentOutcome(AgentStatus.ERROR, error=str(exc), runtime_ref=ref)

        log.info(
            "openhands.turn_ended",
            extra={**fields, "status": outcome.status.value, "error": outcome.error},
        )
        return AgentOutcome(
            outcome.status, output=outcome.output, error=outcome.error, runtime_ref=ref
        )

    def stop(self, runtime_ref: str) -> None:
        """Stop the remote conversation, as far as OpenHands lets us.

        Best effort: callers have stopped the conversation on their side already
        and must go on whatever OpenHands says, so a failure is logged, not
        raised. An id OpenHands does not know (404) needs no stopping.
        """
        budget = 3 * self.request_timeout
        clock = _Clock(time.monotonic() + budget, lambda: True, budget)
        path = f"/api/conversations/{quote(runtime_ref, safe='')}/stop"
        fields = {"openhands": runtime_ref}
        try:
            self._call(clock, "POST", path)
        except _Refused as exc:
            if exc.status == 404:
                log.info("openhands.stop_unknown", extra=fields)
                return
            failure = str(exc)
        except (_Transient, _OutOfTime, OpenHandsError) as exc:
            failure = str(exc) or type(exc).__name__
        else:
            log.info("openhands.stopped", extra=fields)
            return
        # TODO: a failed stop is not tried again; the remote agent keeps working
        # (and billing) until OpenHands closes the conversation for inactivity.
        log.warning("openhands.stop_failed", extra={**fields, "error": failure})

    # The steps of a turn

    def _create(self, clock: _Clock, text: str, context: Mapping[str, str]) -> str:
        """Start a remote conversation with `text` as its first message."""
        body: dict[str, str] = {"initial_user_msg": text}
        repository = context.get("HOOKLINE_REPOSITORY", "")
        if repository:
            body["repository"] = repository
            # Named so OpenHands does not probe every provider it knows.
            body["git_provider"] = "github"
        branch = context.get("HOOKLINE_BRANCH", "")
        if branch:
            body["selected_branch"] = branch

        # An unanswered create may still have started a conversation; asking
        # again could start a second agent on the same task.
        answer = self._call(
            clock, "POST", "/api/conversations", json=body, retry_unanswered=False
        )
        conversation_id = (
            answer.get("conversation_id") if isinstance(answer, dict) else None
        )
        if not isinstance(conversation_id, str) or not conversation_id:
            raise OpenHandsError("OpenHands answered without a conversation_id")
        return conversation_id

    def _send(self, clock: _Clock, ref: str, text: str) -> int:
        """Deliver a follow-up; return the first event id that belongs to it."""
        base = f"/api/conversations/{quote(ref, safe='')}"
        conversation = self._call(clock, "GET", base)
        if not isinstance(conversation, dict):
            raise OpenHandsError(f"OpenHands has no conversation {ref}")
        if conversation.get("status", "RUNNING") not in LIVE_STATUSES:
            # A stopped conversation's agent does not take messages until started.
            self._call(clock, "POST", f"{base}/start", json={})
            log.info("openhands.restarted", extra={"openhands": ref})

        latest = self._events(clock, ref, start_id=0, reverse=True)
        cursor = max((_event_id(event) for event in latest), default=-1) + 1
        pending = _unanswered_message(latest, text)
        if pending is not None:
            # A turn taken over after a crash: its message is there, unanswered.
            log.info("openhands.resumed", extra={"openhands": ref})
            return pending

        attempts = 0

        def deliver() -> None:
            nonlocal attempts
            attempts += 1
            # A failed try may still have delivered it: look before sending again.
            if attempts > 1 and self._delivered(clock, ref, text, cursor):
                return
            self._attempt(clock, "POST", f"{base}/message", {"message": text}, None)

        self._retrying(clock)(deliver)
        return cursor

    def _delivered(self, clock: _Clock, ref: str, text: str, cursor: int) -> bool:
        events = self._events(clock, ref, start_id=cursor, retry=False)
        return any(_user_text(event) == text for event in events)

    def _await_answer(
        self, clock: _Clock, ref: str, cursor: int, purpose: Purpose
    ) -> AgentOutcome:
        """Poll until the agent answers this turn's message, fails, or time runs out."""
        turn = _TurnEvents(next_id=cursor)
        path = f"/api/conversations/{quote(ref, safe='')}"
        delay = self.poll_interval
        while True:
            self._read_new_events(clock, ref, turn)
            outcome = turn.outcome(purpose)
            if outcome is not None:
                return outcome

            conversation = self._call(clock, "GET", path)
            if not isinstance(conversation, dict):
                raise OpenHandsError(f"OpenHands has no conversation {ref}")
            status = str(conversation.get("status") or "RUNNING")
            if status not in LIVE_STATUSES:
                # It may have answered just before it stopped.
                self._read_new_events(clock, ref, turn)
                outcome = turn.outcome(purpose)
                if outcome is not None:
                    return outcome
                raise OpenHandsError(
                    f"the OpenHands conversation is {status.lower()} and its agent "
                    "did not answer"
                )

            if clock.remaining() <= 0:
                raise _OutOfTime
            clock.sleep(delay * random.uniform(0.9, 1.1))
            delay = min(delay * 2, self.poll_max_interval)

    def _read_new_events(self, clock: _Clock, ref: str, turn: _TurnEvents) -> None:
        while True:
            page = self._call(
                clock,
                "GET",
                f"/api/conversations/{quote(ref, safe='')}/events",
                params={"start_id": turn.next_id, "limit": EVENTS_PAGE},
            )
            events, has_more = _page(page)
            for event in events:
                turn.add(event)
                turn.next_id = max(turn.next_id, _event_id(event) + 1)
            if not has_more or not events:
                return

    def _events(
        self,
        clock: _Clock,
        ref: str,
        start_id: int,
        reverse: bool = False,
        retry: bool = True,
    ) -> list[dict]:
        """Return one page of events from `start_id` (newest first if `reverse`)."""
        path = f"/api/conversations/{quote(ref, safe='')}/events"
        params: dict[str, Any] = {"start_id": start_id, "limit": EVENTS_PAGE}
        if reverse:
            params["reverse"] = "true"
        if retry:
            answer = self._call(clock, "GET", path, params=params)
        else:
            answer = self._attempt(clock, "GET", path, None, params)
        return _page(answer)[0]

    def _stop_quietly(self, ref: str | None) -> None:
        if ref is not None:
            self.stop(ref)

    # HTTP

    def _retrying(self, clock: _Clock) -> Retrying:
        """Retry transient failures with backoff, within the turn's deadline."""
        return Retrying(
            retry=retry_if_exception_type(_Transient),
            wait=self._retry_wait,
            stop=lambda state: (
                time.monotonic() + state.upcoming_sleep >= clock.deadline
            ),
            sleep=clock.sleep,
            before_sleep=_log_retry,
            reraise=True,
        )

    def _retry_wait(self, state: RetryCallState) -> float:
        failure = state.outcome.exception() if state.outcome else None
        if isinstance(failure, _Transient) and failure.retry_after is not None:
            return failure.retry_after
        backoff = self.poll_interval * 2 ** (state.attempt_number - 1)
        jitter = random.uniform(0, self.poll_interval / 4)
        return min(backoff, self.poll_max_interval) + jitter

    def _call(
        self,
        clock: _Clock,
        method: str,
        path: str,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        retry_unanswered: bool = True,
    ) -> Any:
        """Make one API call, retrying transient failures; return its JSON body."""
        return self._retrying(clock)(
            self._attempt, clock, method, path, json, params, retry_unanswered
        )

    def _attempt(
        self,
        clock: _Clock,
        method: str,
        path: str,
        json: Any,
        params: Mapping[str, Any] | None,
        retry_unanswered: bool = True,
    ) -> Any:
        remaining = clock.remaining()
        if remaining <= 0:
            raise _OutOfTime
        read_timeout = max(min(self.request_timeout, remaining), 0.05)
        timeout = (min(CONNECT_TIMEOUT, read_timeout), read_timeout)
        try:
            response = self.session.request(
                method,
                self.base_url + path,
                json=json,
                params=params,
                headers=self._headers,
                timeout=timeout,
            )
        except (
            requests.ConnectionError,
            requests.exceptions.ChunkedEncodingError,
        ) as exc:
            raise _Transient(f"{method} {path} failed: {type(exc).__name__}") from exc
        except requests.Timeout as exc:
            if not retry_unanswered:
                raise OpenHandsError(
                    f"OpenHands did not answer {method} {path} within "
                    f"{read_timeout:g} s; it may have acted on it anyway"
                ) from exc
            raise _Transient(
                f"{method} {path} got no answer in {read_timeout:g} s"
            ) from exc
        except requests.RequestException as exc:
            raise OpenHandsError(f"cannot call OpenHands: {exc}") from exc

        status = response.status_code
        if status == 429 or status >= 500:
            raise _Transient(
                f"{method} {path} answered {status}", _retry_after(response)
            )
        if status >= 400:
            log.warning(
                "openhands.call_refused",
                extra={
                    "method": method,
                    "path": path,
                    "status": status,
                    "detail": response.text[:200],
                },
            )
            raise _Refused(status, method, path)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise OpenHandsError(
                f"OpenHands answered {method} {path} with something other than JSON"
            ) from None


def _log_retry(state: RetryCallState) -> None:
    failure = state.outcome.exception() if state.outcome else None
    log.info(
        "openhands.retrying",
        extra={
            "failure": str(failure),
            "attempt": state.attempt_number,
            "wait": round(state.upcoming_sleep, 3),
        },
    )


def _page(answer: Any) -> tuple[list[dict], bool]:
    if not isinstance(answer, dict) or not isinstance(answer.get("events"), list):
        raise OpenHandsError("OpenHands answered an events call without events")
    events = [event for event in answer["events"] if isinstance(event, dict)]
    return events, bool(answer.get("has_more"))


def _event_id(event: Mapping[str, Any]) -> int:
    value = event.get("id")
    return value if isinstance(value, int) else -1


def _user_text(event: Mapping[str, Any]) -> str | None:
    if event.get("source") != "user" or event.get("action") != "message":
        return None
    content = (event.get("args") or {}).get("content")
    return content if isinstance(content, str) else None


def _unanswered_message(newest_first: list[dict], text: str) -> int | None:
    """Return the id of the latest user message if it is `text` and unanswered."""
    for event in newest_first:
        if event.get("observation") == "agent_state_changed":
            state = (event.get("extras") or {}).get("agent_state")
            if state in ANSWERED_STATES or state in FAILED_STATES:
                return None
        user_text = _user_text(event)
        if user_text is not None:
            return _event_id(event) if user_text == text else None
    return None
