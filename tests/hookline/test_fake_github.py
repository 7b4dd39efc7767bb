"""Pin the loopback fake GitHub API to GitHub's documented behaviour."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from hookline.fake_github import FakeGitHub

APP_ID = "424242"
REPOSITORY = "octo-org/hello-world"
REPO_API = f"/repos/{REPOSITORY}"


def _new_key() -> RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _app_jwt(key: RSAPrivateKey, *, iss: str = APP_ID, exp_in: int = 540) -> str:
    # GitHub's guide backdates iat by a minute to absorb clock drift.
    now = int(time.time())
    claims = {"iat": now - 60, "exp": now + exp_in, "iss": iss}
    return jwt.encode(claims, key, algorithm="RS256")


@pytest.fixture(scope="module")
def app_key() -> RSAPrivateKey:
    return _new_key()


@pytest.fixture(scope="module")
def stranger_key() -> RSAPrivateKey:
    return _new_key()


@pytest.fixture
def fake(app_key: RSAPrivateKey) -> Iterator[FakeGitHub]:
    public_pem = app_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with FakeGitHub(APP_ID, public_pem) as running:
        yield running


@pytest.fixture
def http() -> Iterator[requests.Session]:
    # Ignore proxy settings from the environment so every call stays on loopback.
    session = requests.Session()
    session.trust_env = False
    yield session
    session.close()


@pytest.fixture
def api(
    fake: FakeGitHub, app_key: RSAPrivateKey, http: requests.Session
) -> requests.Session:
    minted = http.post(
        f"{fake.url}/app/installations/7/access_tokens",
        headers={"Authorization": f"Bearer {_app_jwt(app_key)}"},
    )
    http.headers["Authorization"] = f"token {minted.json()['token']}"
    return http


def test_valid_app_jwt_mints_an_installation_token(
    fake: FakeGitHub, app_key: RSAPrivateKey, http: requests.Session
) -> None:
    response = http.post(
        f"{fake.url}/app/installations/7/access_tokens",
        headers={"Authorization": f"Bearer {_app_jwt(app_key)}"},
    )

    assert response.status_code == 201
    minted = response.json()
    assert minted["token"].startswith("ghs_fake_")
    assert minted["repository_selection"] == "all"
    expires_at = datetime.strptime(minted["expires_at"], "%Y-%m-%dT%H:%M:%SZ")
    lifetime = expires_at.replace(tzinfo=UTC) - datetime.now(UTC)
    assert timedelta(minutes=59) < lifetime <= timedelta(hours=1)

    issue = http.get(
        f"{fake.url}{REPO_API}/issues/1",
        headers={"Authorization": f"Bearer {minted['token']}"},
    )
    assert issue.status_code == 200


UNDECODABLE = "A JSON web token could not be decoded"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("wrong-key", UNDECODABLE),
        ("wrong-iss", UNDECODABLE),
        ("expired", UNDECODABLE),
        ("missing", UNDECODABLE),
        ("exp-too-far", "'Expiration time' claim ('exp') is too far in the future"),
    ],
    ids=["wrong-key", "wrong-iss", "expired", "missing", "exp-too-far"],
)
def test_bad_app_jwt_is_refused_with_401(
    fake: FakeGitHub,
    app_key: RSAPrivateKey,
    stranger_key: RSAPrivateKey,
    http: requests.Session,
    case: str,
    message: str,
) -> None:
    authorization = {
        "wrong-key": f"Bearer {_app_jwt(stranger_key)}",
        "wrong-iss": f"Bearer {_app_jwt(app_key, iss='999')}",
        "expired": f"Bearer {_app_jwt(app_key, exp_in=-5)}",
        "missing": "",
        "exp-too-far": f"Bearer {_app_jwt(app_key, exp_in=900)}",
    }[case]

    response = http.post(
        f"{fake.url}/app/installations/7/access_tokens",
        headers={"Authorization": authorization},
    )

    assert response.status_code == 401
    assert response.json()["message"] == message
    assert [r.status for r in fake.requests("POST", "/access_tokens")] == [401]


def test_call_without_installation_token_is_unauthorized(
    fake: FakeGitHub, app_key: RSAPrivateKey, http: requests.Session
) -> None:
    anonymous = http.get(f"{fake.url}{REPO_API}/issues/1")
    with_app_jwt = http.get(
        f"{fake.url}{REPO_API}/issues/1",
        headers={"Authorization": f"Bearer {_app_jwt(app_key)}"},
    )

    assert anonymous.status_code == 401
    assert with_app_jwt.status_code == 401
    assert anonymous.json()["message"] == "Bad credentials"
    assert [r.status for r in fake.requests("GET", "/issues/1")] == [401, 401]


def test_issue_comment_and_review_reply_are_recorded(
    fake: FakeGitHub, api: requests.Session
) -> None:
    fake.add_issue(
        REPOSITORY, 5, "Bug", "It breaks", comments=[{"body": "seen", "login": "ann"}]
    )

    created = api.post(f"{fake.url}{REPO_API}/issues/5/comments", json={"body": "hi"})
    reply = api.post(
        f"{fake.url}{REPO_API}/pulls/6/comments/321/replies", json={"body": "done"}
    )
    thread = api.get(f"{fake.url}{REPO_API}/issues/5/comments").json()

    assert created.status_code == 201
    assert created.json()["user"]["login"] == "hookline[bot]"
    assert reply.status_code == 201
    assert reply.json()["in_reply_to_id"] == 321
    recorded = [
        (c["kind"], c["repository"], c["number"], c["body"], c["in_reply_to"])
        for c in fake.comments()
    ]
    assert recorded == [
        ("issue", REPOSITORY, 5, "hi", None),
        ("review_reply", REPOSITORY, 6, "done", 321),
    ]
    assert fake.comments()[1]["path"] == f"{REPO_API}/pulls/6/comments/321/replies"
    # Review replies live on the diff, not in the issue's conversation.
    assert [(c["user"]["login"], c["body"]) for c in thread] == [
        ("ann", "seen"),
        ("hookline[bot]", "hi"),
    ]


def test_comment_without_body_is_rejected_with_422(
    fake: FakeGitHub, api: requests.Session
) -> None:
    response = api.post(f"{fake.url}{REPO_API}/issues/5/comments", json={"body": ""})

    assert response.status_code == 422
    assert fake.comments() == []


def test_comment_list_paginates_with_link_header(
    fake: FakeGitHub, api: requests.Session
) -> None:
    seeded = [{"body": f"c{n}"} for n in range(3)]
    fake.add_issue(REPOSITORY, 9, "Long", "", comments=seeded)

    first = api.get(f"{fake.url}{REPO_API}/issues/9/comments?per_page=2")
    second = api.get(first.links["next"]["url"])

    assert [c["body"] for c in first.json()] == ["c0", "c1"]
    assert [c["body"] for c in second.json()] == ["c2"]
    assert "next" not in second.links


def test_repeated_reaction_answers_200_and_is_recorded_once(
    fake: FakeGitHub, api: requests.Session
) -> None:
    target = f"{fake.url}{REPO_API}/issues/comments/55/reactions"

    first = api.post(target, json={"content": "eyes"})
    repeat = api.post(target, json={"content": "eyes"})
    unknown = api.post(target, json={"content": "thumbsup"})

    assert first.status_code == 201
    assert repeat.status_code == 200
    assert repeat.json()["id"] == first.json()["id"]
    assert unknown.status_code == 422
    assert fake.reactions() == [
        {
            "id": first.json()["id"],
            "repository": REPOSITORY,
            "path": f"{REPO_API}/issues/comments/55/reactions",
            "content": "eyes",
        }
    ]


def test_fail_next_fails_n_times_with_retry_after_then_answers_normally(
    fake: FakeGitHub, api: requests.Session
) -> None:
    fake.fail_next("POST", r"/issues/\d+/comments$", 502, times=2, retry_after=3)
    url = f"{fake.url}{REPO_API}/issues/5/comments"

    answers = [api.post(url, json={"body": "hi"}) for _ in range(3)]

    assert [a.status_code for a in answers] == [502, 502, 201]
    assert answers[0].headers["Retry-After"] == "3"
    assert "Retry-After" not in answers[2].headers
    assert [r.status for r in fake.requests("POST", "/comments")] == [502, 502, 201]
    assert len(fake.comments()) == 1


def test_fail_next_applies_only_to_matching_method_and_path(
    fake: FakeGitHub, api: requests.Session
) -> None:
    fake.fail_next("POST", r"/issues/\d+/comments$", 500)

    listed = api.get(f"{fake.url}{REPO_API}/issues/5/comments")
    reacted = api.post(
        f"{fake.url}{REPO_API}/issues/5/reactions", json={"content": "+1"}
    )
    failed = api.post(f"{fake.url}{REPO_API}/issues/5/comments", json={"body": "x"})

    assert (listed.status_code, reacted.status_code, failed.status_code) == (
        200,
        201,
        500,
    )


def test_delay_longer_than_client_timeout_times_out_once(
    fake: FakeGitHub, api: requests.Session
) -> None:
    fake.fail_next("GET", r"/issues/7$", 0, delay=0.6)
    url = f"{fake.url}{REPO_API}/issues/7"

    with pytest.raises(requests.exceptions.ReadTimeout):
        api.get(url, timeout=0.2)
    started = time.monotonic()
    retried = api.get(url, timeout=0.2)

    assert retried.status_code == 200
    assert time.monotonic() - started < 0.2


def test_reset_forgets_requests_comments_failures_and_permissions(
    fake: FakeGitHub, api: requests.Session
) -> None:
    fake.add_issue(REPOSITORY, 5, "Seeded", "body")
    fake.set_permission(REPOSITORY, "ann", "read")
    api.post(f"{fake.url}{REPO_API}/issues/5/comments", json={"body": "hi"})
    api.post(f"{fake.url}{REPO_API}/issues/5/reactions", json={"content": "eyes"})
    fake.fail_next("GET", r"/issues/5$", 503)

    fake.reset()

    assert fake.requests() == []
    assert fake.comments() == []
    assert fake.reactions() == []
    issue = api.get(f"{fake.url}{REPO_API}/issues/5")
    assert issue.status_code == 200
    assert issue.json()["title"] == "Issue 5"
    permission = api.get(f"{fake.url}{REPO_API}/collaborators/ann/permission")
    assert permission.json()["permission"] == "write"


def test_permission_reports_legacy_role_and_role_name(
    fake: FakeGitHub, api: requests.Session
) -> None:
    fake.set_permission(REPOSITORY, "Mia", "maintain")
    fake.set_permission(REPOSITORY, "tom", "triage")

    mia = api.get(f"{fake.url}{REPO_API}/collaborators/mia/permission").json()
    tom = api.get(f"{fake.url}{REPO_API}/collaborators/tom/permission").json()
    stranger = api.get(f"{fake.url}{REPO_API}/collaborators/zed/permission").json()

    assert (mia["permission"], mia["role_name"]) == ("write", "maintain")
    assert (tom["permission"], tom["role_name"]) == ("read", "triage")
    assert (stranger["permission"], stranger["role_name"]) == ("write", "write")
    assert mia["user"]["login"] == "mia"


def test_seeded_pull_request_reports_its_head_branch(
    fake: FakeGitHub, api: requests.Session
) -> None:
    fake.add_issue(REPOSITORY, 12, "Fix", "", pull_request=True, head_ref="fix-it")
    fake.add_issue(REPOSITORY, 13, "Plain issue", "")

    issue = api.get(f"{fake.url}{REPO_API}/issues/12").json()
    pull = api.get(f"{fake.url}{REPO_API}/pulls/12").json()
    plain = api.get(f"{fake.url}{REPO_API}/issues/13").json()
    not_a_pull = api.get(f"{fake.url}{REPO_API}/pulls/13")

    assert "pull_request" in issue
    assert pull["head"]["ref"] == "fix-it"
    assert pull["base"]["ref"] == "main"
    assert "pull_request" not in plain
    assert not_a_pull.status_code == 404


def test_unknown_endpoint_answers_github_404(
    fake: FakeGitHub, api: requests.Session
) -> None:
    response = api.delete(f"{fake.url}{REPO_API}/issues/5")

    assert response.status_code == 404
    assert response.json()["message"] == "Not Found"
    assert fake.requests("DELETE")[0].status == 404


def test_control_endpoints_drive_the_fake_from_another_process(
    fake: FakeGitHub, http: requests.Session, api: requests.Session
) -> None:
    armed = http.post(
        f"{fake.url}/_fake/fail",
        json={"method": "POST", "path_regex": "/comments$", "status": 429},
    )
    failed = api.post(f"{fake.url}{REPO_API}/issues/5/comments", json={"body": "x"})
    recorded = http.get(f"{fake.url}/_fake/requests").json()
    cleared = http.post(f"{fake.url}/_fake/reset")

    assert armed.status_code == 204
    assert failed.status_code == 429
    assert [(r["method"], r["status"]) for r in recorded][-1] == ("POST", 429)
    assert cleared.status_code == 204
    assert http.get(f"{fake.url}/_fake/requests").json() == []


def test_wait_for_reports_whether_the_predicate_came_true(fake: FakeGitHub) -> None:
    assert fake.wait_for(lambda f: f.requests() == [], timeout=0.1)
    assert not fake.wait_for(lambda f: len(f.comments()) > 0, timeout=0.1)


def test_fake_refuses_to_listen_beyond_loopback(app_key: RSAPrivateKey) -> None:
    public_pem = app_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    with pytest.raises(ValueError, match="loopback"):
        FakeGitHub(APP_ID, public_pem, host="192.0.2.10")
