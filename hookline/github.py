"""GitHub's REST API as Hookline uses it: App authentication and a few calls.

Every call has a timeout. Failures are sorted into those worth retrying later
(network, 5xx, 429, rate-limit 403) and those that will fail the same way again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import redis
import requests
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from hookline import metrics, trace

log = logging.getLogger(__name__)

API_VERSION = "2022-11-28"
# Mint a new installation token this long before GitHub's one-hour expiry.
TOKEN_MARGIN_SECONDS = 300


class GitHubError(Exception):
    """A GitHub call failed; `status` is 0 when no response came back."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class TransientGitHubError(GitHubError):
    """Worth trying again, no sooner than `retry_after` seconds if GitHub said so."""

    def __init__(
        self, message: str, status: int = 0, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status)
        self.retry_after = retry_after


class PermanentGitHubError(GitHubError):
    """GitHub refused the request; sending it again would get the same answer."""


# GitHub's advice for a secondary limit that names no wait: at least a minute.
SECONDARY_LIMIT_WAIT = 60.0


def _retry_after(response: requests.Response) -> float | None:
    header = response.headers.get("Retry-After")
    if header and header.strip().isdigit():
        return float(header)
    reset = response.headers.get("X-RateLimit-Reset")
    if response.headers.get("X-RateLimit-Remaining") == "0" and reset:
        try:
            return max(0.0, float(reset) - time.time())
        except ValueError:
            return None
    if response.status_code == 403:
        return SECONDARY_LIMIT_WAIT
    return None


def _is_rate_limited(response: requests.Response) -> bool:
    if response.headers.get("X-RateLimit-Remaining") == "0":
        return True
    # GitHub's secondary limits come as 403 with this phrase in the message.
    return "secondary rate limit" in response.text.lower()


def check_response(response: requests.Response) -> requests.Response:
    """Return a successful response, or raise the error its status stands for."""
    status = response.status_code
    if status < 400:
        return response
    summary = f"{response.request.method} {_path(response.url)} answered {status}"
    if status == 429 or status >= 500 or (status == 403 and _is_rate_limited(response)):
        raise TransientGitHubError(summary, status, _retry_after(response))
    raise PermanentGitHubError(summary, status)


def _next_cursor(response: requests.Response) -> str | None:
    url = response.links.get("next", {}).get("url")
    if not url:
        return None
    return parse_qs(urlsplit(url).query).get("cursor", [None])[0]


def _path(url: str) -> str:
    return "/" + url.split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0]


@dataclass(frozen=True)
class GitHubApp:
    """The App's identity: it signs JWTs and mints installation tokens."""

    api_url: str
    app_id: str
    # PEM text, or a key already parsed from it (parsing costs 38 ms a JWT).
    private_key: str | PrivateKeyTypes
    timeout: float
    session: requests.Session
    key_prefix: str = "hookline:"

    def token_key(self, installation_id: int) -> str:
        """Return the Redis key that caches an installation's token."""
        return f"{self.key_prefix}installation-token:{installation_id}"

    def jwt(self) -> str:
        """Return a short-lived RS256 JWT that authenticates as the App."""
        now = int(time.time())
        # Backdated a minute because GitHub rejects a JWT issued "in the future"
        # when clocks drift; GitHub allows ten minutes at most.
        claims = {"iat": now - 60, "exp": now + 540, "iss": self.app_id}
        return jwt.encode(claims, self.private_key, algorithm="RS256")

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Call an endpoint that takes the App's own JWT (`/app/...`)."""
        return _send(
            self.session,
            method,
            self.api_url + path,
            self.timeout,
            headers={"Authorization": f"Bearer {self.jwt()}"},
            **kwargs,
        )

    def hook_deliveries(self, max_pages: int) -> Iterator[dict]:
        """Yield the App's webhook deliveries, newest first, for at most a few pages."""
        params: dict[str, object] = {"per_page": 100}
        for _ in range(max_pages):
            response = self.call("GET", "/app/hook/deliveries", params=params)
            yield from response.json()
            cursor = _next_cursor(response)
            if cursor is None:
                return
            params["cursor"] = cursor

    def mint_installation_token(self, installation_id: int) -> tuple[str, float]:
        """Ask GitHub for an installation token; return it and its lifetime in s."""
        path = f"/app/installations/{installation_id}/access_tokens"
        body = self.call("POST", path).json()
        expires_at = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
        return body["token"], expires_at.timestamp() - time.time()

    def installation_token(
        self, installation_id: int, cache: redis.Redis, fresh: bool = False
    ) -> str:
        """Return a cached installation token, minting one when none is fresh.

        `fresh` mints a new one whatever the cache holds (GitHub refused the old).
        """
        key = self.token_key(installation_id)
        cached = None if fresh else cache.get(key)
        if cached:
            return cached.decode()
        token, lifetime = self.mint_installation_token(installation_id)
        ttl = int(lifetime - TOKEN_MARGIN_SECONDS)
        if ttl > 0:
            cache.set(key, token, ex=ttl)
        log.info("github.token_minted", extra={"installation": installation_id})
        return token


def _send(
    session: requests.Session,
    method: str,
    url: str,
    timeout: float,
    **kwargs: Any,
) -> requests.Response:
    headers = {
        "Accept": "application/vnd.github+json",
        "X-GitHub-Api-Version": API_VERSION,
        "User-Agent": "hookline",
        **kwargs.pop("headers", {}),
    }
    started = time.monotonic()
    try:
        response = session.request(
            method, url, headers=headers, timeout=timeout, **kwargs
        )
    except (requests.ConnectionError, requests.Timeout) as exc:
        metrics.github_call(method, url, None)
        trace.note(method, _path(url), None, time.monotonic() - started)
        raise TransientGitHubError(
            f"{method} {_path(url)} failed: {type(exc).__name__}"
        ) from exc
    metrics.github_call(method, url, response.status_code)
    trace.note(method, _path(url), response.status_code, time.monotonic() - started)
    log.debug(
        "github.call",
        extra={"method": method, "path": _path(url), "status": response.status_code},
    )
    return check_response(response)


class WriteBudget:
    """A per-installation allowance of content-creating requests, shared in Redis.

    GitHub's secondary limits forbid more than 80 such requests a minute; every
    worker spends from the same count, so the pools together stay below it.
    """

    def __init__(
        self,
        cache: redis.Redis,
        installation_id: int,
        per_minute: int = 80,
        prefix: str = "hookline:",
    ) -> None:
        self._cache = cache
        self._installation_id = installation_id
        self._per_minute = per_minute
        self._prefix = prefix

    def spend(self) -> None:
        """Take one request from this minute's allowance, or say when to come back."""
        now = time.time()
        minute = int(now // 60)
        key = f"{self._prefix}write-budget:{self._installation_id}:{minute}"
        pipe = self._cache.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, 120)
        spent, _ = pipe.execute()
        if spent > self._per_minute:
            raise TransientGitHubError(
                f"installation {self._installation_id} spent its "
                f"{self._per_minute} writes for this minute",
                retry_after=60 - now % 60,
            )


class GitHubClient:
    """Calls made as one installation, with its token.

    `token` is a token, or a function that returns one and mints a new one when
    asked for a fresh one: GitHub's 401 for a token is answered by one fresh try.
    """

    def __init__(
        self,
        api_url: str,
        token: str | Callable[[bool], str],
        timeout: float,
        session: requests.Session,
        budget: WriteBudget | None = None,
    ) -> None:
        self._api_url = api_url.rstrip("/")
        self._tokens = token if callable(token) else lambda _fresh: token
        self._timeout = timeout
        self._session = session
        self._budget = budget

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        if method != "GET" and self._budget is not None:
            self._budget.spend()
        try:
            response = self._send(method, path, False, **kwargs)
        except PermanentGitHubError as exc:
            if exc.status != 401:
                raise
            log.warning("github.token_rejected", extra={"path": path})
            response = self._send(method, path, True, **kwargs)
        return response.json() if response.content else None

    def _send(
        self, method: str, path: str, fresh_token: bool, **kwargs: Any
    ) -> requests.Response:
        return _send(
            self._session,
            method,
            self._api_url + path,
            self._timeout,
            headers={"Authorization": f"token {self._tokens(fresh_token)}"},
            **kwargs,
        )

    def permission(self, repository: str, login: str) -> str:
        """Return `login`'s permission on `repository`: admin, write, read or none."""
        path = f"/repos/{repository}/collaborators/{login}/permission"
        return self._call("GET", path)["permission"]

    def issue(self, repository: str, number: int) -> dict:
        """Return an issue or pull request seen as an issue."""
        return self._call("GET", f"/repos/{repository}/issues/{number}")

    def issue_comments(
        self,
        repository: str,
        number: int,
        limit: int = 100,
        since: str | None = None,
        page: int = 1,
    ) -> list:
        """Return one page (up to `limit`) of an issue's comments, oldest first.

        `since` (ISO 8601) keeps only comments updated at or after that time.
        """
        path = f"/repos/{repository}/issues/{number}/comments"
        params: dict[str, object] = {"per_page": min(limit, 100), "page": page}
        if since:
            params["since"] = since
        return self._call("GET", path, params=params)[:limit]

    def review_comments(
        self, repository: str, number: int, since: str | None = None
    ) -> list:
        """Return up to 100 review comments on a pull request, oldest first.

        `since` (ISO 8601) keeps only comments updated at or after that time.
        """
        path = f"/repos/{repository}/pulls/{number}/comments"
        params: dict[str, object] = {"per_page": 100}
        if since:
            params["since"] = since
        return self._call("GET", path, params=params)

    def pull_request(self, repository: str, number: int) -> dict:
        """Return a pull request, with its head branch."""
        return self._call("GET", f"/repos/{repository}/pulls/{number}")

    def add_reaction(self, reaction_path: str, content: str) -> None:
        """React to the issue or comment whose reactions live at `reaction_path`."""
        # GitHub answers 200 instead of 201 when the reaction is already there.
        self._call("POST", reaction_path, json={"content": content})

    def create_comment(self, path: str, body: str) -> dict:
        """Post a comment, or a reply in a review thread, at `path`."""
        return self._call("POST", path, json={"body": body})

    def edit_comment(self, path: str, body: str) -> dict:
        """Replace the body of the comment at `path` (see `comment_path`)."""
        return self._call("PATCH", path, json={"body": body})

    def path_of(self, comment: dict) -> str | None:
        """Return the API path of a comment GitHub returned (its `url`, less the base).

        On GitHub Enterprise the base holds a path (`/api/v3`), so the url's path
        alone would not do.
        """
        url = comment.get("url")
        base = self._api_url.split("://", 1)[-1]
        if not isinstance(url, str) or base not in url:
            return None
        return url.split(base, 1)[1] or None
