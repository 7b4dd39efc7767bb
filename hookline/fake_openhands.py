"""Serve a loopback fake of the OpenHands server's conversation API.

It answers the calls hookline.openhands makes, with OpenHands' paths, field names
and event shapes; checks the API key (`Authorization: Bearer` or
`X-Session-API-Key`); keeps conversations and their events in memory; and plays
an agent that answers each user message `agent_delay` seconds after it arrives,
by these rules, checked in order:

1. Text that starts with "Summarize" or "Summarise" (any case, after leading
   blanks) is a summary request: the agent replies with a one-line summary of
   the conversation and its state does not change.
2. The word "fail" (any case; not "failing") sends the agent to `error`.
3. The word "ask" or "question" (not "asks" or "task") gets a question back
   and `awaiting_user_input`.
4. Anything else gets "Done: <first line of the message>" as the agent's final
   thought, and `finished`.

"sleep N" anywhere in a message delays its answer by N more seconds. These are
the rules tests/agent.py follows too ("fail please", "ask please", "sleep N"),
so the end-to-end tests run unchanged on either runtime.

Stopping a conversation drops the agent's pending answers and leaves it
`stopped`. Unlike the real server, which answers a stop for an unknown id with
200 ("was not running"), the fake answers 404, as OpenHands Cloud does for a
conversation that is not the caller's. Tests steer it with Python methods or
the /_fake/ endpoints: fail or stall the next matching calls, list recorded
requests and conversations, reset.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from flask import Flask, Response, g, jsonify, request

from hookline.loopback import LoopbackServer

log = logging.getLogger(__name__)

CONTROL_PREFIX = "/_fake/"
DEFAULT_AGENT_DELAY = 0.2
MAX_EVENTS_PAGE = 100
SUMMARY_REQUEST = re.compile(r"^\s*summari[sz]e", re.IGNORECASE)
FAIL_WORD = re.compile(r"\bfail\b", re.IGNORECASE)
QUESTION_WORD = re.compile(r"\b(ask|question)\b", re.IGNORECASE)
SLEEP = re.compile(r"\bsleep (\d+(?:\.\d+)?)")
# The fields POST /api/conversations takes; the server forbids any other.
INIT_FIELDS = frozenset(
    {
        "repository",
        "git_provider",
        "selected_branch",
        "initial_user_msg",
        "image_urls",
        "replay_json",
        "suggested_task",
        "create_microagent",
        "conversation_instructions",
        "mcp_config",
    }
)


@dataclass
class RecordedRequest:
    """One request the fake received and the status it answered with."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    status: int
    received_at: float = 0.0  # time.monotonic() when the request arrived


@dataclass
class _Failure:
    method: str
    path_pattern: re.Pattern[str]
    status: int
    remaining: int
    retry_after: int | None
    delay: float


@dataclass
class _Conversation:
    conversation_id: str
    repository: str | None
    branch: str | None
    created_at: str
    status: str = "RUNNING"
    agent_state: str = "loading"
    events: list[dict] = field(default_factory=list)
    timers: list[threading.Timer] = field(default_factory=list)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _error(status: int, detail: Any) -> Response:
    # FastAPI's shape for HTTPException and validation errors.
    response = jsonify({"detail": detail})
    response.status_code = status
    return response


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Injected failure"


class FakeOpenHands(LoopbackServer):
    """Run a thread-safe fake of the OpenHands conversation API on a loopback port."""

    name = "fake-openhands"

    def __init__(
        self,
        api_key: str,
        host: str = "127.0.0.1",
        port: int = 0,
        agent_delay: float = DEFAULT_AGENT_DELAY,
    ) -> None:
        super().__init__(host, port)
        self.api_key = api_key
        self.agent_delay = agent_delay

        self._lock = threading.Lock()
        self._conversations: dict[str, _Conversation] = {}
        self._requests: list[RecordedRequest] = []
        self._failures: list[_Failure] = []

        self.app = self._build_app()

    # Lifecycle

    def stop(self) -> None:
        """Stop serving, drop the agent's pending answers, release the port."""
        self.reset()
        super().stop()

    # Test controls

    def reset(self) -> None:
        """Forget conversations, requests and failures; cancel pending answers."""
        with self._lock:
            for conversation in self._conversations.values():
                for timer in conversation.timers:
                    timer.cancel()
            self._conversations.clear()
            self._requests.clear()
            self._failures.clear()

    def requests(
        self, method: str | None = None, path_contains: str | None = None
    ) -> list[RecordedRequest]:
        """Return recorded requests, oldest first, optionally filtered."""
        with self._lock:
            recorded = list(self._requests)
        if method is not None:
            recorded = [r for r in recorded if r.method == method.upper()]
        if path_contains is not None:
            recorded = [r for r in recorded if path_contains in r.path]
        return recorded

    def conversations(self) -> list[dict]:
        """Return every conversation with its state and messages, oldest first."""
        with self._lock:
            return [_describe(c) for c in self._conversations.values()]

    def fail_next(
        self,
        method: str,
        path_regex: str,
        status: int,
        times: int = 1,
        retry_after: int | None = None,
        delay: float = 0.0,
    ) -> None:
        """Answer the next `times` matching requests with `status` after `delay`.

        Status 0 only stalls: the request gets its normal answer `delay` seconds
        late, which is how a test makes a call hang past the client's timeout.
        """
        if status != 0 and not 100 <= status <= 599:
            raise ValueError(f"status must be 0 or an HTTP status, not {status}")
        if times < 1:
            raise ValueError(f"times must be at least 1, not {times}")
        if delay < 0:
            raise ValueError(f"delay must not be negative, not {delay}")
        failure = _Failure(
            method=method.upper(),
            path_pattern=re.compile(path_regex),
            status=status,
            remaining=times,
            retry_after=retry_after,
            delay=delay,
        )
        with self._lock:
            self._failures.append(failure)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Poll `predicate` until it holds or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.01)
        return predicate()

    # The app

    def _build_app(self) -> Flask:
        app = Flask(__name__)
        app.json.sort_keys = False
        app.before_request(self._before_request)
        app.after_request(self._after_request)
        app.register_error_handler(404, lambda error: _error(404, "Not Found"))
        app.register_error_handler(405, lambda error: _error(405, "Method Not Allowed"))

        def route(rule: str, view: Callable[..., Response], method: str) -> None:
            app.add_url_rule(rule, f"{method} {rule}", view, methods=[method])

        one = "/api/conversations/<conversation_id>"
        route("/api/conversations", self._create, "POST")
        route(one, self._get, "GET")
        route(f"{one}/events", self._events, "GET")
        route(f"{one}/message", self._message, "POST")
        route(f"{one}/start", self._start, "POST")
        route(f"{one}/stop", self._stop, "POST")

        route("/_fake/requests", self._control_requests, "GET")
        route("/_fake/conversations", self._control_conversations, "GET")
        route("/_fake/reset", self._control_reset, "POST")
        route("/_fake/fail", self._control_fail, "POST")
        return app

    def _before_request(self) -> Response | None:
        if request.path.startswith(CONTROL_PREFIX):
            return None
        g.received_at = time.monotonic()

        failure = self._take_failure(request.method, request.path)
        if failure is not None:
            log.info(
                "fake_openhands.failure_injected",
                extra={
                    "method": request.method,
                    "path": request.path,
                    "status": failure.status,
                },
            )
            time.sleep(failure.delay)
            if failure.status != 0:
                response = _error(failure.status, _phrase(failure.status))
                if failure.retry_after is not None:
                    response.headers["Retry-After"] = str(failure.retry_after)
                return response

        if not self._authorized():
            return _error(401, "Unauthorized")
        return None

    def _after_request(self, response: Response) -> Response:
        if request.path.startswith(CONTROL_PREFIX):
            return response
        body = request.get_json(silent=True) if request.get_data() else None
        entry = RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.args),
            headers=dict(request.headers),
            body=body,
            status=response.status_code,
            received_at=g.get("received_at", 0.0),
        )
        with self._lock:
            self._requests.append(entry)
        return response

    def _authorized(self) -> bool:
        bearer = request.headers.get("Authorization", "")
        session_key = request.headers.get("X-Session-API-Key", "")
        return bearer == f"Bearer {self.api_key}" or session_key == self.api_key

    def _take_failure(self, method: str, path: str) -> _Failure | None:
        with self._lock:
            for failure in self._failures:
                if failure.method == method and failure.path_pattern.search(path):
                    failure.remaining -= 1
                    if failure.remaining == 0:
                        self._failures.remove(failure)
                    return failure
        return None

    # The API

    def _create(self) -> Response:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return _error(422, "the body must be a JSON object")
        unknown = sorted(set(body) - INIT_FIELDS)
        if unknown:
            # InitSessionRequest is declared with extra='forbid'.
            return _error(
                422, [f"extra field not permitted: {name}" for name in unknown]
            )
        text = body.get("initial_user_msg")

        conversation = _Conversation(
            conversation_id=uuid.uuid4().hex,
            repository=body.get("repository"),
            branch=body.get("selected_branch"),
            created_at=_now(),
        )
        with self._lock:
            self._conversations[conversation.conversation_id] = conversation
            self._set_state(conversation, "loading")
            if text:
                self._receive(conversation, text)
            else:
                self._set_state(conversation, "awaiting_user_input")
        return jsonify(
            {
                "status": "ok",
                "conversation_id": conversation.conversation_id,
                "message": None,
                "conversation_status": "STARTING",
            }
        )

    def _get(self, conversation_id: str) -> Response:
        with self._lock:
            conversation = self._conversations.get(conversation_id)
            if conversation is None:
                # The real route returns None, which FastAPI sends as `null`.
                return jsonify(None)
            return jsonify(
                {
                    "conversation_id": conversation_id,
                    "title": f"Conversation {conversation_id[:5]}",
                    "last_updated_at": _now(),
                    "status": conversation.status,
                    "runtime_status": None,
                    "selected_repository": conversation.repository,
                    "selected_branch": conversation.branch,
                    "git_provider": "github" if conversation.repository else None,
                    "trigger": "remote_api_key",
                    "num_connections": 0,
                    "url": None,
                    "session_api_key": None,
                    "created_at": conversation.created_at,
                    "pr_number": [],
                }
            )

    def _events(self, conversation_id: str) -> Response:
        try:
            start_id = int(request.args.get("start_id", 0))
            limit = int(request.args.get("limit", 20))
            end_id = request.args.get("end_id")
            end = int(end_id) if end_id is not None else None
        except ValueError:
            return _error(422, "start_id, end_id and limit must be integers")
        if limit < 0 or limit > MAX_EVENTS_PAGE:
            return _error(400, "Invalid limit")
        reverse = request.args.get("reverse", "false").lower() in ("true", "1")

        with self._lock:
            conversation = self._conversations.get(conversation_id)
            if conversation is None:
                return _error(404, f"Conversation {conversation_id} not found")
            matching = [
                dict(event)
                for event in conversation.events
                if event["id"] >= start_id and (end is None or event["id"] <= end)
            ]
        if reverse:
            matching.reverse()
        return jsonify({"events": matching[:limit], "has_more": len(matching) > limit})

    def _message(self, conversation_id: str) -> Response:
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("message"), str):
            return _error(422, 'the body must be {"message": <text>}')
        with self._lock:
            conversation = self._conversations.get(conversation_id)
            # The real route attaches to a running agent loop and answers 404
            # when there is none to attach to.
            if conversation is None or conversation.status != "RUNNING":
                return _error(404, f"Conversation {conversation_id} not found")
            self._receive(conversation, body["message"])
        return jsonify({"success": True})

    def _start(self, conversation_id: str) -> Response:
        # The real route takes a ProvidersSetModel body, which may be empty.
        if not isinstance(request.get_json(silent=True), dict):
            return _error(422, "the body must be a JSON object")
        with self._lock:
            conversation = self._conversations.get(conversation_id)
            if conversation is None:
                return _error(404, f"Conversation {conversation_id} not found")
            if conversation.status != "RUNNING":
                conversation.status = "RUNNING"
                # A restarted agent loop loads the history and waits for input.
                self._set_state(conversation, "loading")
                self._set_state(conversation, "awaiting_user_input")
        return jsonify(
            {
                "status": "ok",
                "conversation_id": conversation_id,
                "message": None,
                "conversation_status": "RUNNING",
            }
        )

    def _stop(self, conversation_id: str) -> Response:
        with self._lock:
            conversation = self._conversations.get(conversation_id)
            if conversation is None:
                return _error(404, f"Conversation {conversation_id} not found")
            was = conversation.status
            if was == "RUNNING":
                for timer in conversation.timers:
                    timer.cancel()
                conversation.timers.clear()
                self._set_state(conversation, "stopped")
                conversation.status = "STOPPED"
        message = (
            "Conversation stopped successfully"
            if was == "RUNNING"
            else "Conversation was not running"
        )
        return jsonify(
            {
                "status": "ok",
                "conversation_id": conversation_id,
                "message": message,
                "conversation_status": was,
            }
        )

    # The agent; every method below runs with the lock held.

    def _append(self, conversation: _Conversation, event: dict) -> None:
        event = {"id": len(conversation.events), "timestamp": _now(), **event}
        conversation.events.append(event)

    def _set_state(
        self, conversation: _Conversation, state: str, reason: str = ""
    ) -> None:
        conversation.agent_state = state
        self._append(
            conversation,
            {
                "source": "environment",
                "message": "",
                "observation": "agent_state_changed",
                "content": "",
                "extras": {"agent_state": state, "reason": reason},
            },
        )

    def _say(self, conversation: _Conversation, text: str, wait: bool) -> None:
        self._append(
            conversation,
            {
                "source": "agent",
                "message": text,
                "action": "message",
                "args": {
                    "content": text,
                    "file_urls": [],
                    "image_urls": [],
                    "wait_for_response": wait,
                },
            },
        )

    def _receive(self, conversation: _Conversation, text: str) -> None:
        self._append(
            conversation,
            {
                "source": "user",
                "message": text,
                "action": "message",
                "args": {
                    "content": text,
                    "file_urls": [],
                    "image_urls": [],
                    "wait_for_response": False,
                },
            },
        )
        if SUMMARY_REQUEST.match(text):
            self._schedule(conversation, self._summarize)
            return
        self._set_state(conversation, "running")
        pause = SLEEP.search(text)
        self._schedule(
            conversation,
            lambda c: self._answer(c, text),
            float(pause.group(1)) if pause else 0.0,
        )

    def _schedule(
        self,
        conversation: _Conversation,
        answer: Callable[[_Conversation], None],
        extra_delay: float = 0.0,
    ) -> None:
        def fire() -> None:
            with self._lock:
                if timer in conversation.timers:
                    conversation.timers.remove(timer)
                # Stopped or forgotten meanwhile: the answer never comes.
                current = self._conversations.get(conversation.conversation_id)
                if current is conversation and conversation.status == "RUNNING":
                    answer(conversation)

        timer = threading.Timer(self.agent_delay + extra_delay, fire)
        timer.daemon = True
        conversation.timers.append(timer)
        timer.start()

    def _answer(self, conversation: _Conversation, text: str) -> None:
        request_line = _first_line(text)
        if FAIL_WORD.search(text):
            self._set_state(conversation, "error", "the fake agent gave up as asked")
        elif QUESTION_WORD.search(text):
            self._say(
                conversation,
                f"Question: what should I know before I start on {request_line!r}?",
                wait=True,
            )
            self._set_state(conversation, "awaiting_user_input")
        else:
            final = f"Done: {request_line}"
            self._append(
                conversation,
                {
                    "source": "agent",
                    "message": final,
                    "action": "finish",
                    "args": {"final_thought": final, "outputs": {}, "thought": ""},
                },
            )
            self._set_state(conversation, "finished")

    def _summarize(self, conversation: _Conversation) -> None:
        asked = [
            text
            for text in _user_texts(conversation)
            if not SUMMARY_REQUEST.match(text)
        ]
        latest = _first_line(asked[-1]) if asked else "nothing yet"
        self._say(
            conversation,
            f"Summary: {len(asked)} request(s) so far, the latest: {latest}; "
            f"the agent is {conversation.agent_state}.",
            wait=False,
        )

    # Control endpoints

    def _control_requests(self) -> Response:
        recorded = self.requests(
            request.args.get("method"), request.args.get("path_contains")
        )
        return jsonify([asdict(entry) for entry in recorded])

    def _control_conversations(self) -> Response:
        return jsonify(self.conversations())

    def _control_reset(self) -> Response:
        self.reset()
        return Response(status=204)

    def _control_fail(self) -> Response:
        arguments = request.get_json(silent=True)
        if not isinstance(arguments, dict):
            return _error(400, "send the fail_next arguments as a JSON object")
        try:
            self.fail_next(**arguments)
        except (TypeError, ValueError, re.error) as exc:
            return _error(400, str(exc))
        return Response(status=204)


def _user_texts(conversation: _Conversation) -> list[str]:
    return [
        event["args"]["content"]
        for event in conversation.events
        if event.get("source") == "user" and event.get("action") == "message"
    ]


def _describe(conversation: _Conversation) -> dict:
    messages = []
    for event in conversation.events:
        if event.get("action") in ("message", "finish"):
            args = event["args"]
            text = args.get("content") or args.get("final_thought") or ""
            messages.append({"role": event["source"], "text": text})
    return {
        "conversation_id": conversation.conversation_id,
        "repository": conversation.repository,
        "branch": conversation.branch,
        "status": conversation.status,
        "agent_state": conversation.agent_state,
        "messages": messages,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the fake in the foreground until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m hookline.fake_openhands",
        description="Serve a fake OpenHands conversation API on loopback.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", required=True, help="the key clients must send")
    parser.add_argument(
        "--agent-delay",
        type=float,
        default=DEFAULT_AGENT_DELAY,
        help="seconds the agent takes to answer a message",
    )
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO)
    fake = FakeOpenHands(args.api_key, args.host, args.port, args.agent_delay)
    fake.start()
    print(fake.url, flush=True)

    # Process managers stop their children with SIGTERM; treat it like Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
