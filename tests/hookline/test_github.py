"""Pin App authentication and the GitHub client against the loopback fake."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
import redis
import requests

from hookline.devtools import free_port
from hookline.fake_github import FakeGitHub
from hookline.github import (
    GitHubApp,
    GitHubClient,
    PermanentGitHubError,
    TransientGitHubError,
    WriteBudget,
)
from tests.conftest import APP_ID

REPOSITORY = "octo-user/Hello-World"
PERMISSION_PATH = r"/collaborators/[^/]+/permission$"
COMMENTS_PATH = f"/repos/{REPOSITORY}/issues/1/comments"
REACTIONS_PATH = f"/repos/{REPOSITORY}/issues/comments/492700400/reactions"


@pytest.fixture
def session() -> Iterator[requests.Session]:
    # Ignore proxy settings from the environment so every call stays on loopback.
    session = requests.Session()
    session.trust_env = False
    yield session
    session.close()


@pytest.fixture
def github_app(
    fake_github: FakeGitHub, app_key: tuple[Path, bytes], session: requests.Session
) -> GitHubApp:
    fake_github.reset()
    return GitHubApp(
        api_url=fake_github.url,
        app_id=APP_ID,
        private_key=app_key[0].read_text(),
        timeout=2.0,
        session=session,
    )


@pytest.fixture
def installation_id(redis_client: redis.Redis, github_app: GitHubApp) -> Iterator[int]:
    """Return an installation id no other test uses; drop its cached token after."""
    installation = 10**9 + uuid.uuid4().int % 10**9
    yield installation
    redis_client.delete(github_app.token_key(installation))


@pytest.fixture
def token(github_app: GitHubApp, installation_id: int, fake_github: FakeGitHub) -> str:
    """Return a fresh installation token, with the fake's request log cleared."""
    minted, _ = github_app.mint_installation_token(installation_id)
    fake_github.reset()
    return minted


@pytest.fixture
def client(
    token: str, fake_github: FakeGitHub, session: requests.Session
) -> GitHubClient:
    return GitHubClient(fake_github.url, token, 2.0, session)


def test_app_jwt_is_short_lived_and_issued_by_the_app(
    github_app: GitHubApp, app_key: tuple[Path, bytes]
) -> None:
    claims = jwt.decode(github_app.jwt(), app_key[1], algorithms=["RS256"])

    assert claims["iss"] == APP_ID
    assert claims["iat"] <= time.time()
    assert claims["exp"] - time.time() <= 600


def test_app_jwt_mints_an_installation_token_for_an_hour(
    github_app: GitHubApp, installation_id: int
) -> None:
    token, lifetime = github_app.mint_installation_token(installation_id)

    assert token.startswith("ghs_")
    assert 3590 < lifetime <= 3600


def test_installation_token_is_cached_in_redis(
    github_app: GitHubApp,
    installation_id: int,
    fake_github: FakeGitHub,
    redis_client: redis.Redis,
) -> None:
    first = github_app.installation_token(installation_id, redis_client)
    second = github_app.installation_token(installation_id, redis_client)

    assert second == first
    assert len(fake_github.requests(path_contains="access_tokens")) == 1


def test_cached_token_expires_before_github_expires_it(
    github_app: GitHubApp, installation_id: int, redis_client: redis.Redis
) -> None:
    github_app.installation_token(installation_id, redis_client)

    ttl = redis_client.ttl(github_app.token_key(installation_id))
    assert 0 < ttl <= 3600 - 60


def test_server_error_is_transient(
    client: GitHubClient, fake_github: FakeGitHub
) -> None:
    fake_github.fail_next("GET", PERMISSION_PATH, 502)

    with pytest.raises(TransientGitHubError) as raised:
        client.permission(REPOSITORY, "octo-user")

    assert raised.value.status == 502


def test_error_message_names_the_call_not_the_token(
    client: GitHubClient, fake_github: FakeGitHub, token: str
) -> None:
    fake_github.fail_next("GET", PERMISSION_PATH, 502)

    with pytest.raises(TransientGitHubError) as raised:
        client.permission(REPOSITORY, "octo-user")

    assert "/permission" in str(raised.value)
    assert token not in str(raised.value)


def test_too_many_requests_is_transient_with_retry_after(
    client: GitHubClient, fake_github: FakeGitHub
) -> None:
    fake_github.fail_next("GET", PERMISSION_PATH, 429, retry_after=7)

    with pytest.raises(TransientGitHubError) as raised:
        client.permission(REPOSITORY, "octo-user")

    assert raised.value.status == 429
    assert raised.value.retry_after == 7


def test_exhausted_primary_rate_limit_waits_until_reset(
    client: GitHubClient, fake_github: FakeGitHub
) -> None:
    reset = int(time.time()) + 30
    fake_github.fail_next(
        "GET",
        PERMISSION_PATH,
        403,
        headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(reset)},
    )

    with pytest.raises(TransientGitHubError) as raised:
        client.permission(REPOSITORY, "octo-user")

    assert raised.value.status == 403
    assert raised.value.retry_after is not None
    assert 25 < raised.value.retry_after <= 30


def test_secondary_rate_limit_without_headers_waits_at_least_a_minute(
    client: GitHubClient, fake_github: FakeGitHub
) -> None:
    # GitHub's rate-limit docs: with neither retry-after nor a spent
    # x-ratelimit-remaining, "wait for at least one minute before retrying".
    fake_github.fail_next(
        "GET",
        PERMISSION_PATH,
        403,
        body={"message": "You have exceeded a secondary rate limit"},
    )

    with pytest.raises(TransientGitHubError) as raised:
        client.permission(REPOSITORY, "octo-user")

    assert raised.value.status == 403
    assert raised.value.retry_after is not None
    assert raised.value.retry_after >= 60


@pytest.mark.parametrize("status", [403, 404, 422])
def test_refusal_is_permanent(
    client: GitHubClient, fake_github: FakeGitHub, status: int
) -> None:
    fake_github.fail_next("GET", PERMISSION_PATH, status)

    with pytest.raises(PermanentGitHubError) as raised:
        client.permission(REPOSITORY, "octo-user")

    assert raised.value.status == status


def test_blank_comment_refused_by_github_is_permanent(client: GitHubClient) -> None:
    with pytest.raises(PermanentGitHubError) as raised:
        client.create_comment(COMMENTS_PATH, "   ")

    assert raised.value.status == 422


def test_answer_slower_than_the_timeout_is_transient(
    token: str, fake_github: FakeGitHub, session: requests.Session
) -> None:
    impatient = GitHubClient(fake_github.url, token, 0.2, session)
    fake_github.fail_next("GET", PERMISSION_PATH, 0, delay=0.6)

    with pytest.raises(TransientGitHubError) as raised:
        impatient.permission(REPOSITORY, "octo-user")

    assert raised.value.status == 0
    # Let the stalled request finish so it is not recorded in a later test.
    assert fake_github.wait_for(
        lambda fake: len(fake.requests(path_contains="/permission")) == 1, 3
    )


def test_unreachable_github_is_transient(session: requests.Session) -> None:
    unreachable = GitHubClient(f"http://127.0.0.1:{free_port()}", "t", 1.0, session)

    with pytest.raises(TransientGitHubError) as raised:
        unreachable.permission(REPOSITORY, "octo-user")

    assert raised.value.status == 0


def test_create_comment_posts_the_body_at_the_path(
    client: GitHubClient, fake_github: FakeGitHub
) -> None:
    body = "Done ✅ — 修复了 the parser.\n\n```py\nprint(1)\n```"

    created = client.create_comment(COMMENTS_PATH, body)

    posted = fake_github.requests(method="POST")
    assert [(request.path, request.body) for request in posted] == [
        (COMMENTS_PATH, {"body": body})
    ]
    [comment] = fake_github.comments()
    assert (comment["path"], comment["body"]) == (COMMENTS_PATH, body)
    assert created["id"] == comment["id"]


def test_create_comment_at_a_replies_path_answers_in_the_thread(
    client: GitHubClient, fake_github: FakeGitHub
) -> None:
    path = f"/repos/{REPOSITORY}/pulls/2/comments/284312630/replies"

    client.create_comment(path, "Extracted into a helper.")

    [reply] = fake_github.comments()
    assert reply["kind"] == "review_reply"
    assert reply["in_reply_to"] == 284312630
    assert reply["body"] == "Extracted into a helper."


def test_calls_send_the_pinned_api_version(
    client: GitHubClient, fake_github: FakeGitHub
) -> None:
    client.permission(REPOSITORY, "octo-user")

    [call] = fake_github.requests()
    assert call.headers["X-Github-Api-Version"] == "2022-11-28"
    assert call.headers["Accept"] == "application/vnd.github+json"


def test_repeated_reaction_is_recorded_once_without_error(
    client: GitHubClient, fake_github: FakeGitHub
) -> None:
    client.add_reaction(REACTIONS_PATH, "eyes")
    client.add_reaction(REACTIONS_PATH, "eyes")

    posted = fake_github.requests(method="POST", path_contains="/reactions")
    assert [request.status for request in posted] == [201, 200]
    assert [
        (reaction["path"], reaction["content"]) for reaction in fake_github.reactions()
    ] == [(REACTIONS_PATH, "eyes")]


def test_permission_is_write_by_default(client: GitHubClient) -> None:
    assert client.permission(REPOSITORY, "octo-user") == "write"


def test_permission_reports_a_lowered_role(
    client: GitHubClient, fake_github: FakeGitHub
) -> None:
    fake_github.set_permission(REPOSITORY, "octo-user", "read")

    assert client.permission(REPOSITORY, "octo-user") == "read"


def test_write_budget_refuses_past_its_allowance_until_the_next_minute(
    redis_client,
) -> None:
    budget = WriteBudget(redis_client, installation_id=987_001, per_minute=3)
    for key in redis_client.scan_iter("hookline:write-budget:987001:*"):
        redis_client.delete(key)

    for _ in range(3):
        budget.spend()
    with pytest.raises(TransientGitHubError) as refused:
        budget.spend()

    assert 0 < refused.value.retry_after <= 60
    assert refused.value.status == 0


def test_spent_budget_stops_a_write_before_it_reaches_github(
    fake_github: FakeGitHub, redis_client, session
) -> None:
    fake_github.reset()
    budget = WriteBudget(redis_client, installation_id=987_002, per_minute=0)
    client = GitHubClient(fake_github.url, "unused", 2.0, session, budget)

    with pytest.raises(TransientGitHubError):
        client.create_comment(f"/repos/{REPOSITORY}/issues/1/comments", "hello")

    assert fake_github.requests("POST") == []


def test_rejected_token_is_minted_again_once(
    fake_github: FakeGitHub, github_app: GitHubApp, redis_client, session
) -> None:
    fake_github.reset()
    asked: list[bool] = []

    def tokens(fresh: bool) -> str:
        asked.append(fresh)
        if not fresh:
            return "ghs_revoked"
        return github_app.installation_token(987_003, redis_client, fresh=True)

    client = GitHubClient(fake_github.url, tokens, 2.0, session)

    assert client.permission(REPOSITORY, "octo-user") == "write"
    assert asked == [False, True]
    assert [r.status for r in fake_github.requests("GET")] == [401, 200]
    redis_client.delete(github_app.token_key(987_003))
