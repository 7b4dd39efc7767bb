"""Serve a loopback fake of the GitHub REST API for tests and demos.

It answers the handful of calls Hookline makes with the paths, status codes and
response shapes GitHub documents, records every request it receives, and can be
told to fail or stall the next matching requests.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import itertools
import logging
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import requests
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from flask import Flask, Response, g, jsonify, request

from hookline.loopback import POLL_INTERVAL_SECONDS, LoopbackServer, require_loopback

logger = logging.getLogger(__name__)

DOCS_URL = "https://docs.github.com/rest"
BOT_USER = {"login": "hookline[bot]", "id": 41898282, "type": "Bot"}
ISSUE_AUTHOR = {"login": "octo-user", "id": 1000001, "type": "User"}
REACTION_CONTENTS = frozenset(
    {"+1", "-1", "laugh", "confused", "heart", "hooray", "rocket", "eyes"}
)
ROLES = ("admin", "maintain", "write", "triage", "read", "none")
# The `user.permissions` flags GitHub reports, each with the least role that has it.
ROLE_FLAGS = {
    "admin": "admin",
    "maintain": "maintain",
    "push": "write",
    "triage": "triage",
    "pull": "read",
}
# GitHub's `permission` field only speaks the legacy base roles; the real role
# is in `role_name`.
LEGACY_PERMISSION = {
    "admin": "admin",
    "maintain": "write",
    "write": "write",
    "triage": "read",
    "read": "read",
    "none": "none",
}
DEFAULT_PERMISSION = "write"
DEFAULT_TOKEN_PERMISSIONS = {
    "issues": "write",
    "pull_requests": "write",
    "metadata": "read",
}
TOKEN_LIFETIME = timedelta(hours=1)
# GitHub refuses app JWTs whose `exp` is more than ten minutes ahead.
MAX_JWT_LIFETIME_SECONDS = 600
JWT_UNDECODABLE = "A JSON web token could not be decoded"
JWT_EXP_TOO_FAR = "'Expiration time' claim ('exp') is too far in the future"
TOKEN_PATH = re.compile(r"^/app/installations/[^/]+/access_tokens$")
# Endpoints that take the App's JWT instead of an installation token.
APP_PATH = re.compile(r"^/app/(installations/[^/]+/access_tokens|hook/deliveries)")
CONTROL_PREFIX = "/_fake/"


@dataclass
class RecordedRequest:
    """One request the fake received and the status it answered with."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: dict | list | None
    status: int
    received_at: float = 0.0  # time.monotonic() when the request arrived


@dataclass
class _Failure:
    method: str
    path_pattern: re.Pattern[str]
    status: int
    remaining: int
    retry_after: int | None
    headers: dict[str, str]
    body: dict | None
    delay: float
    late_answer: bool = False


@dataclass
class _Issue:
    title: str
    body: str
    pull_request: bool
    head_ref: str | None


@dataclass
class _Token:
    installation_id: int
    expires_at: datetime


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _github_error(status: int, message: str, **extra: Any) -> Response:
    """Build an error response shaped like GitHub's."""
    payload = {"message": message, **extra, "documentation_url": DOCS_URL}
    payload.setdefault("status", str(status))
    response = jsonify(payload)
    response.status_code = status
    return response


def _validation_failed(resource: str, field: str, code: str) -> Response:
    error = {"resource": resource, "code": code, "field": field}
    return _github_error(422, "Validation Failed", errors=[error])


def _status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Injected failure"


def _sha_for(*parts: object) -> str:
    """Return a fake commit sha that is the same on every read and every run."""
    seed = "/".join(str(part) for part in parts)
    return hashlib.sha1(seed.encode(), usedforsecurity=False).hexdigest()


class FakeGitHub(LoopbackServer):
    """Run a thread-safe fake of the GitHub REST API on a loopback port."""

    name = "fake-github"

    def __init__(
        self,
        app_id: str,
        public_key_pem: bytes,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host, port)
        self.app_id = str(app_id)
        # Parse now so a bad key fails at construction, not at the first JWT.
        self._public_key = load_pem_public_key(public_key_pem)

        self._lock = threading.Lock()
        # Ids keep counting across reset() so ids stay unique within a run.
        self._ids = itertools.count(900_000_001)
        self._tokens: dict[str, _Token] = {}
        self._requests: list[RecordedRequest] = []
        self._failures: list[_Failure] = []
        self._permissions: dict[tuple[str, str], str] = {}
        self._issues: dict[tuple[str, int], _Issue] = {}
        self._issue_comments: dict[tuple[str, int], list[dict]] = {}
        self._comments: list[dict] = []
        self._review_comments: dict[tuple[str, int], list[dict]] = {}
        self._hook_deliveries: list[dict] = []
        self._hook_bodies: dict[str, tuple[str, bytes]] = {}
        self._redeliver_to: tuple[str, bytes] | None = None
        self._reactions: list[dict] = []
        self._reactions_by_key: dict[tuple[int, str, str], dict] = {}

        self.app = self._build_app()

    # Test controls

    def reset(self) -> None:
        """Forget requests, failures, permissions, issues, comments, reactions."""
        # Issued tokens survive: clients cache them for an hour, as with GitHub.
        with self._lock:
            self._requests.clear()
            self._failures.clear()
            self._permissions.clear()
            self._issues.clear()
            self._issue_comments.clear()
            self._comments.clear()
            self._review_comments.clear()
            self._hook_deliveries.clear()
            self._hook_bodies.clear()
            self._reactions.clear()
            self._reactions_by_key.clear()

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

    def comments(self) -> list[dict]:
        """Return every comment and review reply created, oldest first."""
        with self._lock:
            return [dict(comment) for comment in self._comments]

    def reactions(self) -> list[dict]:
        """Return every distinct reaction created, oldest first."""
        with self._lock:
            return [dict(reaction) for reaction in self._reactions]

    def fail_next(
        self,
        method: str,
        path_regex: str,
        status: int,
        times: int = 1,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
        body: dict | None = None,
        delay: float = 0.0,
        late_answer: bool = False,
    ) -> None:
        """Answer the next `times` matching requests with `status` after `delay`.

        Status 0 only delays: the request then gets its normal answer. With
        `late_answer`, it takes effect at once and only the answer is delayed, as
        when GitHub has stored a comment but the reply never reaches the client.
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
            headers=dict(headers or {}),
            body=body,
            delay=delay,
            late_answer=late_answer,
        )
        with self._lock:
            self._failures.append(failure)

    def add_hook_delivery(
        self,
        guid: str,
        event: str,
        status_code: int,
        body: bytes,
        delivered_at: datetime | None = None,
    ) -> int:
        """Record a delivery GitHub attempted to the App's webhook; return its id.

        A redelivery requested through the API really POSTs `body` to the URL
        given to `redeliver_to`, signed with its secret, as GitHub would.
        """
        moment = delivered_at or _utcnow()
        with self._lock:
            delivery_id = self._next_id()
            self._hook_deliveries.append(
                {
                    "id": delivery_id,
                    "guid": guid,
                    "delivered_at": _timestamp(moment),
                    "redelivery": False,
                    "duration": 0.1,
                    "status": "OK"
                    if status_code < 300
                    else HTTPStatus(status_code).phrase,
                    "status_code": status_code,
                    "event": event,
                    "action": None,
                    "installation_id": None,
                    "repository_id": None,
                }
            )
            self._hook_bodies[guid] = (event, body)
        return delivery_id

    def add_review_comment(
        self,
        repository: str,
        number: int,
        body: str,
        login: str = "octo-user",
        in_reply_to: int | None = None,
    ) -> int:
        """Seed a review comment on a pull request; return its id."""
        now = _timestamp(_utcnow())
        with self._lock:
            comment_id = self._next_id()
            comment = {
                "id": comment_id,
                "body": body,
                "user": {"login": login, "type": "User"},
                "created_at": now,
                "updated_at": now,
            }
            if in_reply_to is not None:
                comment["in_reply_to_id"] = in_reply_to
            self._review_comments.setdefault((repository.lower(), number), []).append(
                comment
            )
        return comment_id

    def redeliver_to(self, events_url: str, secret: str) -> None:
        """Send redeliveries requested through the API to `events_url`."""
        require_loopback(urlsplit(events_url).hostname or "", "a redelivery target")
        with self._lock:
            self._redeliver_to = (events_url, secret.encode())

    def set_permission(self, repository: str, login: str, permission: str) -> None:
        """Give `login` a role on `repository` (unknown users have "write")."""
        if permission not in ROLES:
            raise ValueError(f"permission must be one of {ROLES}, not {permission!r}")
        with self._lock:
            self._permissions[(repository.lower(), login.lower())] = permission

    def add_issue(
        self,
        repository: str,
        number: int,
        title: str,
        body: str,
        *,
        pull_request: bool = False,
        head_ref: str | None = None,
        comments: list[dict] | None = None,
    ) -> None:
        """Seed an issue or pull request, with existing comments, on `repository`.

        Each seeded comment needs `body`; `user` (or a `login` shorthand), `id`
        and `created_at` are filled in when absent.
        """
        key = (repository.lower(), number)
        with self._lock:
            seeded = [self._seeded_comment(comment) for comment in comments or []]
            self._issues[key] = _Issue(title, body, pull_request, head_ref)
            self._issue_comments[key] = seeded

    def add_comment(
        self, repository: str, number: int, body: str, login: str = "mallory"
    ) -> dict:
        """Append a comment by a person (not the App) to an issue's thread."""
        key = (repository.lower(), number)
        with self._lock:
            comment = self._seeded_comment({"body": body, "login": login})
            comment["url"] = (
                f"{self.url}/repos/{repository}/issues/comments/{comment['id']}"
            )
            self._issue_comments.setdefault(key, []).append(comment)
            return dict(comment)

    def wait_for(
        self, predicate: Callable[[FakeGitHub], bool], timeout: float = 30.0
    ) -> bool:
        """Poll `predicate` every 50 ms; return whether it held before `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_INTERVAL_SECONDS)

    # State helpers; callers hold self._lock

    def _next_id(self) -> int:
        return next(self._ids)

    def _app_summary(self) -> dict:
        """Return the `performed_via_github_app` GitHub adds to an App's comments."""
        return {"id": int(self.app_id), "slug": "hookline", "name": "Hookline"}

    def _seeded_comment(self, comment: dict) -> dict:
        seeded = dict(comment)
        login = seeded.pop("login", ISSUE_AUTHOR["login"])
        seeded.setdefault("id", self._next_id())
        seeded.setdefault("body", "")
        seeded.setdefault("user", {"login": login, "type": "User"})
        seeded.setdefault("created_at", _timestamp(_utcnow()))
        seeded.setdefault("updated_at", seeded["created_at"])
        return seeded

    def _take_failure(self, method: str, path: str) -> _Failure | None:
        with self._lock:
            for failure in self._failures:
                if failure.method != method or not failure.path_pattern.search(path):
                    continue
                failure.remaining -= 1
                if failure.remaining == 0:
                    self._failures.remove(failure)
                return failure
        return None

    def _record(self, status: int) -> None:
        recorded = RecordedRequest(
            method=request.method,
            path=request.path,
            query=request.args.to_dict(),
            headers=dict(request.headers),
            body=request.get_json(force=True, silent=True),
            status=status,
            received_at=g.get("received_at", time.monotonic()),
        )
        with self._lock:
            self._requests.append(recorded)
        g.recorded = True

    def _installation_for(self, authorization: str) -> int | None:
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() not in ("token", "bearer"):
            return None
        with self._lock:
            token = self._tokens.get(credential.strip())
        if token is None or token.expires_at <= _utcnow():
            return None
        return token.installation_id

    def _jwt_rejection(self, authorization: str) -> str | None:
        """Return why GitHub would refuse this app JWT, or None to accept it."""
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            return JWT_UNDECODABLE
        try:
            claims = jwt.decode(
                credential.strip(),
                self._public_key,
                algorithms=["RS256"],
                options={"require": ["exp", "iat", "iss"]},
            )
        except jwt.PyJWTError:
            return JWT_UNDECODABLE
        if str(claims["iss"]) != self.app_id:
            return JWT_UNDECODABLE
        if claims["exp"] - time.time() > MAX_JWT_LIFETIME_SECONDS:
            return JWT_EXP_TOO_FAR
        return None

    # HTTP

    def _build_app(self) -> Flask:
        app = Flask(__name__)
        app.json.sort_keys = False
        app.before_request(self._before_request)
        app.after_request(self._after_request)
        app.register_error_handler(404, self._not_found)
        # GitHub answers an unsupported method on a known path with 404.
        app.register_error_handler(405, self._not_found)
        app.register_error_handler(500, self._server_error)

        def route(rule: str, view: Callable[..., Response], method: str) -> None:
            app.add_url_rule(rule, f"{method} {rule}", view, methods=[method])

        route(
            "/app/installations/<int:installation_id>/access_tokens",
            self._create_access_token,
            "POST",
        )
        repo = "/repos/<owner>/<repo>"
        route(
            f"{repo}/collaborators/<username>/permission", self._get_permission, "GET"
        )
        route("/app/hook/deliveries", self._list_hook_deliveries, "GET")
        route(
            "/app/hook/deliveries/<int:delivery_id>/attempts",
            self._redeliver,
            "POST",
        )
        route(f"{repo}/issues/<int:number>", self._get_issue, "GET")
        route(f"{repo}/issues/<int:number>/comments", self._list_comments, "GET")
        route(
            f"{repo}/issues/<int:number>/comments", self._create_issue_comment, "POST"
        )
        route(f"{repo}/pulls/<int:number>", self._get_pull, "GET")
        route(f"{repo}/pulls/<int:number>/comments", self._list_review_comments, "GET")
        route(
            f"{repo}/pulls/<int:number>/comments/<int:comment_id>/replies",
            self._create_review_reply,
            "POST",
        )
        route(
            f"{repo}/issues/comments/<int:comment_id>",
            partial(self._edit_comment, self._issue_comments, "IssueComment"),
            "PATCH",
        )
        route(
            f"{repo}/pulls/comments/<int:comment_id>",
            partial(
                self._edit_comment, self._review_comments, "PullRequestReviewComment"
            ),
            "PATCH",
        )
        route(f"{repo}/issues/<int:number>/reactions", self._create_reaction, "POST")
        route(
            f"{repo}/issues/comments/<int:comment_id>/reactions",
            self._create_reaction,
            "POST",
        )
        route(
            f"{repo}/pulls/comments/<int:comment_id>/reactions",
            self._create_reaction,
            "POST",
        )

        route("/_fake/requests", self._control_requests, "GET")
        route("/_fake/comments", self._control_comments, "GET")
        route("/_fake/reactions", self._control_reactions, "GET")
        route("/_fake/reset", self._control_reset, "POST")
        route("/_fake/fail", self._control_fail, "POST")
        return app

    def _before_request(self) -> Response | None:
        if request.path.startswith(CONTROL_PREFIX):
            return None
        g.received_at = time.monotonic()

        failure = self._take_failure(request.method, request.path)
        if failure is not None:
            logger.info(
                "fake_github.failure_injected",
                extra={
                    "method": request.method,
                    "path": request.path,
                    "status": failure.status,
                    "delay": failure.delay,
                },
            )
            if failure.status == 0 and failure.late_answer:
                g.late_answer = failure.delay
            elif failure.status == 0:
                time.sleep(failure.delay)
            else:
                return self._injected_failure(failure)

        if APP_PATH.match(request.path):
            return None

        installation_id = self._installation_for(
            request.headers.get("Authorization", "")
        )
        if installation_id is None:
            return _github_error(401, "Bad credentials")
        g.installation_id = installation_id
        return None

    def _injected_failure(self, failure: _Failure) -> Response:
        body = failure.body
        if body is None:
            body = {"message": _status_phrase(failure.status)}
        response = jsonify(body)
        response.status_code = failure.status
        if failure.retry_after is not None:
            response.headers["Retry-After"] = str(failure.retry_after)
        response.headers.update(failure.headers)

        # Record on arrival, not after the sleep, so the log keeps arrival order
        # when a client times out and retries while this answer is pending.
        self._record(failure.status)
        time.sleep(failure.delay)
        return response

    def _after_request(self, response: Response) -> Response:
        if request.path.startswith(CONTROL_PREFIX):
            return response
        time.sleep(g.get("late_answer", 0.0))
        injected = g.get("recorded", False)
        if not injected:
            self._record(response.status_code)

        response.headers.setdefault("X-GitHub-Request-Id", secrets.token_hex(8))
        # An injected failure carries only the rate-limit headers its test chose,
        # so a client never waits on a reset time the test did not ask for.
        if not injected:
            reset = int(time.time()) + 3600
            response.headers.setdefault("X-RateLimit-Limit", "5000")
            response.headers.setdefault("X-RateLimit-Remaining", "4999")
            response.headers.setdefault("X-RateLimit-Used", "1")
            response.headers.setdefault("X-RateLimit-Reset", str(reset))
            response.headers.setdefault("X-RateLimit-Resource", "core")
        logger.debug(
            "fake_github.answered",
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status_code,
            },
        )
        return response

    def _not_found(self, error: Exception) -> Response:
        return _github_error(404, "Not Found")

    def _server_error(self, error: Exception) -> Response:
        # Flask has already logged the traceback; the client sees GitHub's shape.
        return _github_error(500, "Server Error")

    def _api_url(self, path: str) -> str:
        return request.host_url.rstrip("/") + path

    def _json_body(self) -> tuple[Any, Response | None]:
        """Parse the request body as JSON, or say why GitHub would refuse it."""
        if not request.get_data():
            return None, None
        body = request.get_json(force=True, silent=True)
        if body is None:
            return None, _github_error(400, "Problems parsing JSON")
        return body, None

    def _create_access_token(self, installation_id: int) -> Response:
        rejection = self._jwt_rejection(request.headers.get("Authorization", ""))
        if rejection is not None:
            return _github_error(401, rejection)

        body, error = self._json_body()
        if error is not None:
            return error
        permissions = DEFAULT_TOKEN_PERMISSIONS
        if isinstance(body, dict) and isinstance(body.get("permissions"), dict):
            permissions = body["permissions"]

        token = f"ghs_fake_{secrets.token_hex(16)}"
        expires_at = _utcnow().replace(microsecond=0) + TOKEN_LIFETIME
        with self._lock:
            self._tokens[token] = _Token(installation_id, expires_at)

        response = jsonify(
            {
                "token": token,
                "expires_at": _timestamp(expires_at),
                "permissions": permissions,
                "repository_selection": "all",
            }
        )
        response.status_code = 201
        return response

    def _get_permission(self, owner: str, repo: str, username: str) -> Response:
        key = (f"{owner}/{repo}".lower(), username.lower())
        with self._lock:
            role = self._permissions.get(key, DEFAULT_PERMISSION)
        rank = ROLES[::-1].index(role)
        granted = {
            flag: rank >= ROLES[::-1].index(needed)
            for flag, needed in ROLE_FLAGS.items()
        }
        return jsonify(
            {
                "permission": LEGACY_PERMISSION[role],
                "role_name": role,
                "user": {
                    "login": username,
                    "type": "User",
                    "permissions": granted,
                    "role_name": role,
                },
            }
        )

    def _issue_payload(self, owner: str, repo: str, number: int) -> dict:
        key = (f"{owner}/{repo}".lower(), number)
        with self._lock:
            issue = self._issues.get(key)
            comment_count = len(self._issue_comments.get(key, []))
        if issue is None:
            issue = _Issue(f"Issue {number}", "", False, None)

        api_path = f"/repos/{owner}/{repo}/issues/{number}"
        kind = "pull" if issue.pull_request else "issues"
        payload = {
            "id": 700_000_000 + number,
            "url": self._api_url(api_path),
            "repository_url": self._api_url(f"/repos/{owner}/{repo}"),
            "comments_url": self._api_url(f"{api_path}/comments"),
            "html_url": self._api_url(f"/{owner}/{repo}/{kind}/{number}"),
            "number": number,
            "state": "open",
            "title": issue.title,
            "body": issue.body,
            "user": dict(ISSUE_AUTHOR),
            "labels": [],
            "assignees": [],
            "locked": False,
            "comments": comment_count,
            "author_association": "OWNER",
            "created_at": "2024-01-01T00:00:00Z",
            "updated_at": "2024-01-01T00:00:00Z",
            "closed_at": None,
        }
        if issue.pull_request:
            pull_path = f"/repos/{owner}/{repo}/pulls/{number}"
            payload["pull_request"] = {
                "url": self._api_url(pull_path),
                "html_url": payload["html_url"],
                "diff_url": f"{payload['html_url']}.diff",
                "patch_url": f"{payload['html_url']}.patch",
                "merged_at": None,
            }
        return payload

    def _list_hook_deliveries(self) -> Response:
        rejection = self._jwt_rejection(request.headers.get("Authorization", ""))
        if rejection is not None:
            return _github_error(401, rejection)
        per_page = min(max(request.args.get("per_page", 30, type=int), 1), 100)
        cursor = request.args.get("cursor", 0, type=int)
        with self._lock:
            newest_first = list(reversed(self._hook_deliveries))
        response = jsonify(newest_first[cursor : cursor + per_page])
        if cursor + per_page < len(newest_first):
            url = self._api_url(request.path)
            response.headers["Link"] = (
                f'<{url}?per_page={per_page}&cursor={cursor + per_page}>; rel="next"'
            )
        return response

    def _redeliver(self, delivery_id: int) -> Response:
        rejection = self._jwt_rejection(request.headers.get("Authorization", ""))
        if rejection is not None:
            return _github_error(401, rejection)
        with self._lock:
            original = next(
                (d for d in self._hook_deliveries if d["id"] == delivery_id), None
            )
            target = self._redeliver_to
        if original is None:
            return _github_error(404, "Not Found")
        event, body = self._hook_bodies[original["guid"]]
        status_code = 0
        if target is not None:
            url, secret = target
            signature = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
            session = requests.Session()
            # Never through a proxy from the environment: loopback only.
            session.trust_env = False
            try:
                answer = session.post(
                    url,
                    data=body,
                    timeout=10,
                    headers={
                        "Content-Type": "application/json",
                        "X-GitHub-Event": event,
                        # A redelivery keeps the original delivery's GUID.
                        "X-GitHub-Delivery": original["guid"],
                        "X-Hub-Signature-256": signature,
                    },
                )
                status_code = answer.status_code
            except requests.RequestException:
                status_code = 0
            finally:
                session.close()
        with self._lock:
            self._hook_deliveries.append(
                {
                    **original,
                    "id": self._next_id(),
                    "redelivery": True,
                    "delivered_at": _timestamp(_utcnow()),
                    "status_code": status_code,
                    "status": "OK" if 200 <= status_code < 300 else "failed",
                }
            )
        return Response(status=202)

    def _get_issue(self, owner: str, repo: str, number: int) -> Response:
        return jsonify(self._issue_payload(owner, repo, number))

    def _list_comments(self, owner: str, repo: str, number: int) -> Response:
        return self._page(self._issue_comments, owner, repo, number)

    def _list_review_comments(self, owner: str, repo: str, number: int) -> Response:
        return self._page(self._review_comments, owner, repo, number)

    def _page(
        self,
        threads: dict[tuple[str, int], list[dict]],
        owner: str,
        repo: str,
        number: int,
    ) -> Response:
        per_page = min(max(request.args.get("per_page", 30, type=int), 1), 100)
        page = max(request.args.get("page", 1, type=int), 1)
        with self._lock:
            thread = list(threads.get((f"{owner}/{repo}".lower(), number), []))
        # GitHub's `since`: only comments updated at or after that ISO 8601 time.
        since = request.args.get("since")
        if since:
            thread = [c for c in thread if c.get("updated_at", "") >= since]
        start = (page - 1) * per_page
        response = jsonify(thread[start : start + per_page])
        last_page = max((len(thread) + per_page - 1) // per_page, 1)
        links = []
        if page < last_page:
            links.append(self._page_link(per_page, page + 1, "next"))
            links.append(self._page_link(per_page, last_page, "last"))
        if page > 1:
            links.append(self._page_link(per_page, 1, "first"))
            links.append(self._page_link(per_page, page - 1, "prev"))
        if links:
            response.headers["Link"] = ", ".join(links)
        return response

    def _page_link(self, per_page: int, page: int, relation: str) -> str:
        url = self._api_url(request.path)
        return f'<{url}?per_page={per_page}&page={page}>; rel="{relation}"'

    def _comment_body(self, resource: str) -> tuple[str, Response | None]:
        body, error = self._json_body()
        if error is not None:
            return "", error
        if not isinstance(body, dict) or "body" not in body:
            return "", _validation_failed(resource, "body", "missing_field")
        if not isinstance(body["body"], str) or not body["body"].strip():
            return "", _validation_failed(resource, "body", "invalid")
        return body["body"], None

    def _create_issue_comment(self, owner: str, repo: str, number: int) -> Response:
        text, error = self._comment_body("IssueComment")
        if error is not None:
            return error

        repository = f"{owner}/{repo}"
        now = _timestamp(_utcnow())
        key = (repository.lower(), number)
        with self._lock:
            comment_id = self._next_id()
            issue = self._issues.get(key)
            kind = "pull" if issue is not None and issue.pull_request else "issues"
            comment = {
                "id": comment_id,
                "url": self._api_url(
                    f"/repos/{repository}/issues/comments/{comment_id}"
                ),
                "html_url": self._api_url(
                    f"/{repository}/{kind}/{number}#issuecomment-{comment_id}"
                ),
                "issue_url": self._api_url(f"/repos/{repository}/issues/{number}"),
                "body": text,
                "user": dict(BOT_USER),
                "performed_via_github_app": self._app_summary(),
                "author_association": "NONE",
                "created_at": now,
                "updated_at": now,
            }
            self._issue_comments.setdefault(key, []).append(comment)
            self._comments.append(
                {
                    "id": comment_id,
                    "kind": "issue",
                    "repository": repository,
                    "number": number,
                    "body": text,
                    "in_reply_to": None,
                    "path": request.path,
                }
            )
        response = jsonify(comment)
        response.status_code = 201
        return response

    def _get_pull(self, owner: str, repo: str, number: int) -> Response:
        repository = f"{owner}/{repo}"
        with self._lock:
            issue = self._issues.get((repository.lower(), number))
        # A number seeded as a plain issue is not a pull request on GitHub either.
        if issue is not None and not issue.pull_request:
            return _github_error(404, "Not Found")
        if issue is None:
            issue = _Issue(f"Pull request {number}", "", True, None)

        head_ref = issue.head_ref or "feature-branch"
        return jsonify(
            {
                "id": 800_000_000 + number,
                "url": self._api_url(f"/repos/{repository}/pulls/{number}"),
                "html_url": self._api_url(f"/{repository}/pull/{number}"),
                "number": number,
                "state": "open",
                "title": issue.title,
                "body": issue.body,
                "user": dict(ISSUE_AUTHOR),
                "draft": False,
                "merged": False,
                "head": {
                    "ref": head_ref,
                    "sha": _sha_for(repository.lower(), number, head_ref),
                    "label": f"{owner}:{head_ref}",
                    "repo": {"full_name": repository},
                },
                "base": {
                    "ref": "main",
                    "sha": _sha_for(repository.lower(), "main"),
                    "label": f"{owner}:main",
                },
            }
        )

    def _create_review_reply(
        self, owner: str, repo: str, number: int, comment_id: int
    ) -> Response:
        text, error = self._comment_body("PullRequestReviewComment")
        if error is not None:
            return error

        repository = f"{owner}/{repo}"
        now = _timestamp(_utcnow())
        with self._lock:
            reply_id = self._next_id()
            reply = {
                "id": reply_id,
                "url": self._api_url(f"/repos/{repository}/pulls/comments/{reply_id}"),
                "html_url": self._api_url(
                    f"/{repository}/pull/{number}#discussion_r{reply_id}"
                ),
                "pull_request_url": self._api_url(
                    f"/repos/{repository}/pulls/{number}"
                ),
                "in_reply_to_id": comment_id,
                "body": text,
                "user": dict(BOT_USER),
                "performed_via_github_app": self._app_summary(),
                "author_association": "NONE",
                "created_at": now,
                "updated_at": now,
            }
            self._review_comments.setdefault((repository.lower(), number), []).append(
                reply
            )
            self._comments.append(
                {
                    "id": reply_id,
                    "kind": "review_reply",
                    "repository": repository,
                    "number": number,
                    "body": text,
                    "in_reply_to": comment_id,
                    "path": request.path,
                }
            )
        response = jsonify(reply)
        response.status_code = 201
        return response

    def _edit_comment(
        self,
        threads: dict[tuple[str, int], list[dict]],
        resource: str,
        owner: str,
        repo: str,
        comment_id: int,
    ) -> Response:
        text, error = self._comment_body(resource)
        if error is not None:
            return error
        repository = f"{owner}/{repo}".lower()
        with self._lock:
            found = next(
                (
                    comment
                    for (name, _number), thread in threads.items()
                    if name == repository
                    for comment in thread
                    if comment["id"] == comment_id
                ),
                None,
            )
            if found is None:
                return _github_error(404, "Not Found")
            found["body"] = text
            found["updated_at"] = _timestamp(_utcnow())
            for record in self._comments:
                if record["id"] == comment_id:
                    record["body"] = text
                    record["edits"] = record.get("edits", 0) + 1
            edited = dict(found)
        return jsonify(edited)

    def _create_reaction(self, owner: str, repo: str, **target: int) -> Response:
        body, error = self._json_body()
        if error is not None:
            return error
        content = body.get("content") if isinstance(body, dict) else None
        if content not in REACTION_CONTENTS:
            return _validation_failed("Reaction", "content", "invalid")

        # GitHub keeps one reaction per user, target and content; the app's bot
        # user is the installation here.
        key = (g.installation_id, request.path.lower(), content)
        with self._lock:
            existing = self._reactions_by_key.get(key)
            if existing is not None:
                return jsonify(existing)

            reaction_id = self._next_id()
            reaction = {
                "id": reaction_id,
                "user": dict(BOT_USER),
                "content": content,
                "created_at": _timestamp(_utcnow()),
            }
            self._reactions_by_key[key] = reaction
            self._reactions.append(
                {
                    "id": reaction_id,
                    "repository": f"{owner}/{repo}",
                    "path": request.path,
                    "content": content,
                }
            )
        response = jsonify(reaction)
        response.status_code = 201
        return response

    def _control_requests(self) -> Response:
        recorded = self.requests(
            request.args.get("method"), request.args.get("path_contains")
        )
        return jsonify([asdict(entry) for entry in recorded])

    def _control_comments(self) -> Response:
        return jsonify(self.comments())

    def _control_reactions(self) -> Response:
        return jsonify(self.reactions())

    def _control_reset(self) -> Response:
        self.reset()
        return Response(status=204)

    def _control_fail(self) -> Response:
        arguments = request.get_json(force=True, silent=True)
        if not isinstance(arguments, dict):
            return _github_error(400, "Send the fail_next arguments as a JSON object")
        try:
            self.fail_next(**arguments)
        except (TypeError, ValueError, re.error) as exc:
            return _github_error(400, str(exc))
        return Response(status=204)


def main(argv: list[str] | None = None) -> int:
    """Run the fake in the foreground until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m hookline.fake_github",
        description="Serve a fake GitHub REST API on loopback.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--app-id", required=True, help="the GitHub App id")
    parser.add_argument(
        "--public-key",
        required=True,
        type=Path,
        help="PEM file with the app's public key, to verify its JWTs",
    )
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO)
    fake = FakeGitHub(args.app_id, args.public_key.read_bytes(), args.host, args.port)
    fake.start()
    print(fake.url, flush=True)

    # Process managers such as honcho stop their children with SIGTERM; treat it
    # like Ctrl-C so the port is released either way.
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
