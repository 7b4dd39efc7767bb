"""What every task needs once per worker process: settings, clients, retry policy."""

from __future__ import annotations

import logging
import random
import sys
import threading
from functools import cache

import kombu.exceptions
import redis
import requests
from celery import Task, signals
from cryptography.hazmat.primitives import serialization
from sqlalchemy.exc import InterfaceError, OperationalError

from config.settings import ConfigError, Settings, load_settings
from hookline import trace
from hookline.github import (
    GitHubApp,
    GitHubClient,
    TransientGitHubError,
    WriteBudget,
)
from workers.celery_app import OUTAGE_BACKOFF_MAX

log = logging.getLogger(__name__)

# An outage of the database, Redis or the broker is waited out, not turned into a
# lost task: Celery retries it with jittered exponential backoff.
OUTAGES = (
    OperationalError,
    InterfaceError,
    redis.ConnectionError,
    redis.TimeoutError,
    kombu.exceptions.OperationalError,
)
OUTAGE_RETRY = {
    "autoretry_for": OUTAGES,
    "retry_backoff": True,
    "retry_backoff_max": OUTAGE_BACKOFF_MAX,
    "retry_jitter": True,
    "max_retries": 10,
}


@cache
def settings() -> Settings:
    """Return this worker's settings, read once from the environment."""
    return load_settings()


@cache
def redis_client() -> redis.Redis:
    """Return this worker's Redis client (installation tokens live there)."""
    return redis.Redis.from_url(
        settings().REDIS_URL, socket_timeout=5, socket_connect_timeout=5
    )


_thread = threading.local()


def http_session() -> requests.Session:
    """Return this thread's HTTP session, keeping connections to GitHub alive."""
    # One per thread: pools that run tasks in threads share no Session state.
    session = getattr(_thread, "http_session", None)
    if session is None:
        session = _thread.http_session = _new_session()
    return session


def _new_session() -> requests.Session:
    session = requests.Session()
    # Proxies and CA bundle come from the environment: read once here, since with
    # trust_env requests scans the environment again on every call (0.3 ms each).
    environment = session.merge_environment_settings(
        settings().GITHUB_API_URL, {}, None, None, None
    )
    session.proxies.update(environment["proxies"])
    session.verify = environment["verify"]
    session.trust_env = False
    return session


@signals.task_prerun.connect
def _note_github_calls(**_: object) -> None:
    trace.begin()


@signals.task_postrun.connect
def _keep_github_calls(task: Task, kwargs: dict | None = None, **_: object) -> None:
    delivery_id = str((kwargs or {}).get("delivery_id", ""))
    trace.end(settings().DATABASE_URL, delivery_id, task.name)


@signals.worker_init.connect
def _refuse_to_start_without_credentials(**_: object) -> None:
    # A worker that cannot authenticate would accept deliveries only to fail them.
    try:
        github_app()
    except ConfigError as exc:
        print(f"hookline worker: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


@cache
def github_app() -> GitHubApp:
    """Return the App identity; fails with the missing variable's name."""
    app_id, private_key = settings().require_app_credentials()
    try:
        key = serialization.load_pem_private_key(private_key.encode(), password=None)
    except (ValueError, TypeError):
        raise ConfigError(
            "The GitHub App private key (GITHUB_APP_PRIVATE_KEY_PATH or "
            "GITHUB_APP_PRIVATE_KEY) is not an unencrypted PEM private key."
        ) from None
    return GitHubApp(
        api_url=settings().GITHUB_API_URL.rstrip("/"),
        app_id=app_id,
        # The parsed key: from PEM text PyJWT would parse and check it again for
        # every JWT it signs, 40 ms each, where signing alone takes 0.3 ms.
        private_key=key,  # type: ignore[arg-type]
        timeout=settings().HOOKLINE_GITHUB_TIMEOUT,
        session=http_session(),
        key_prefix=settings().HOOKLINE_REDIS_PREFIX,
    )


def installation_client(installation_id: int) -> GitHubClient:
    """Return a client acting as one installation of the App."""

    tokens: list[str] = []

    def token(fresh: bool) -> str:
        if fresh or not tokens:
            app = github_app()
            tokens[:] = [app.installation_token(installation_id, redis_client(), fresh)]
        return tokens[0]

    return GitHubClient(
        settings().GITHUB_API_URL,
        token,
        settings().HOOKLINE_GITHUB_TIMEOUT,
        http_session(),
        WriteBudget(
            redis_client(), installation_id, prefix=settings().HOOKLINE_REDIS_PREFIX
        ),
    )


def retry_delay(retries: int, retry_after: float | None, config: Settings) -> float:
    """Return the wait before retry number `retries` + 1: doubling, jittered, capped."""
    base = config.HOOKLINE_RETRY_BASE
    delay = base * 2**retries + random.uniform(0, base)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, config.HOOKLINE_RETRY_MAX_DELAY)


def retry_later(task: Task, exc: TransientGitHubError) -> None:
    """Schedule `task` again after a backoff, or return once its retries are spent."""
    config = settings()
    retries = task.request.retries
    if retries >= config.HOOKLINE_MAX_RETRIES:
        return
    countdown = retry_delay(retries, exc.retry_after, config)
    log.warning(
        "task.retrying",
        extra={
            "task_name": task.name,
            "error": str(exc),
            "attempt": retries + 1,
            "countdown": round(countdown, 2),
        },
    )
    raise task.retry(exc=exc, countdown=countdown, max_retries=None)


# A message whose worker dies under it is delivered again (acks_late with
# reject_on_worker_lost); one that kills every worker it reaches would loop forever.
MAX_STARTS_PER_ATTEMPT = 3


def may_start(
    cache: redis.Redis, task_id: str, retries: int, prefix: str = "hookline:"
) -> bool:
    """Count a start of this attempt of a task; False once it started too often."""
    key = f"{prefix}task-starts:{task_id}:{retries}"
    try:
        pipe = cache.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, 24 * 3600)
        starts, _ = pipe.execute()
    except redis.RedisError:
        # Without the count, run it: losing the cap is better than losing the task.
        return True
    return starts <= MAX_STARTS_PER_ATTEMPT


class GuardedTask(Task):
    """A task that stops being run after its workers died under it too often."""

    def __call__(self, *args: object, **kwargs: object) -> object:
        request = self.request
        if not request.called_directly and not may_start(
            redis_client(),
            request.id,
            request.retries,
            settings().HOOKLINE_REDIS_PREFIX,
        ):
            log.error(
                "task.poisoned",
                extra={"task_name": self.name, "starts": MAX_STARTS_PER_ATTEMPT + 1},
            )
            return None
        return super().__call__(*args, **kwargs)
