"""Probes: `/healthz` says the process is up, `/readyz` that it can do its work.

Readiness asks Redis, the broker and the database one cheap question each, all at
once, and answers within about a second whatever they do. It is its own route: the
webhook path still never touches the database.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from flask import Blueprint, Response, current_app, jsonify
from flask.blueprints import BlueprintSetupState
from kombu import Connection
from sqlalchemy import text

from config.settings import Settings
from hookline.db import engine_for

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 1.0
# A dependency that hangs holds its check's thread until its socket gives up (a
# database connect has no timeout of its own). Cap those threads per dependency:
# past the cap the probe reports a timeout without starting another.
MAX_PENDING_CHECKS = 2
_EXTENSION = "hookline.readiness"

bp = Blueprint("health", __name__)


@dataclass
class Dependency:
    """One service the gateway needs, and the cheap question that tells it answers."""

    name: str
    check: Callable[[], object]
    slots: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(MAX_PENDING_CHECKS)
    )


def _redis_check(url: str, timeout: float) -> Callable[[], object]:
    client = redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout
    )
    return client.ping


def _broker_check(url: str, timeout: float) -> Callable[[], object]:
    options = {"socket_timeout": timeout, "socket_connect_timeout": timeout}

    def connect() -> None:
        # A fresh connection each time: one kept open can look alive after its
        # server went away. Redis transports PING when they connect.
        with Connection(
            url, connect_timeout=timeout, transport_options=options
        ) as connection:
            connection.ensure_connection(max_retries=0)

    return connect


def _database_check(url: str) -> Callable[[], object]:
    def select_one() -> None:
        with engine_for(url).connect() as connection:
            connection.execute(text("SELECT 1"))

    return select_one


def dependencies_for(
    settings: Settings, timeout: float = CHECK_TIMEOUT
) -> list[Dependency]:
    """Return the services readiness checks for `settings`."""
    return [
        Dependency("redis", _redis_check(settings.REDIS_URL, timeout)),
        Dependency("broker", _broker_check(settings.broker_url, timeout)),
        Dependency("database", _database_check(settings.DATABASE_URL)),
    ]


def _attempt(dependency: Dependency, outcomes: dict[str, str]) -> None:
    try:
        dependency.check()
    except Exception as exc:
        # The type only: a driver's message can carry a host name or a user.
        log.warning(
            "readiness.check_failed",
            extra={"dependency": dependency.name, "error": type(exc).__name__},
        )
        outcomes[dependency.name] = "down"
    else:
        outcomes[dependency.name] = "ok"
    finally:
        dependency.slots.release()


def check_dependencies(
    dependencies: list[Dependency], timeout: float = CHECK_TIMEOUT
) -> dict[str, str]:
    """Ask every dependency at once; each is "ok", "down" or "timeout"."""
    outcomes: dict[str, str] = {}
    threads = []
    for dependency in dependencies:
        if not dependency.slots.acquire(blocking=False):
            continue
        thread = threading.Thread(
            target=_attempt,
            args=(dependency, outcomes),
            name=f"readyz-{dependency.name}",
            daemon=True,
        )
        thread.start()
        threads.append(thread)

    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return {
        dependency.name: outcomes.get(dependency.name, "timeout")
        for dependency in dependencies
    }


@bp.record_once
def _prepare(state: BlueprintSetupState) -> None:
    settings = state.options.get("settings")
    if not isinstance(settings, Settings):
        raise TypeError("register the health blueprint with settings=<Settings>")
    state.app.extensions[_EXTENSION] = dependencies_for(settings)


def _uncached(response: Response) -> Response:
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/healthz")
def healthz() -> Response:
    """Say the process is up; ask nothing of anything else."""
    return _uncached(jsonify(status="ok"))


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """Say whether Redis, the broker and the database each answer in time."""
    checks = check_dependencies(current_app.extensions[_EXTENSION])
    down = [name for name, outcome in checks.items() if outcome != "ok"]
    if not down:
        return _uncached(jsonify(status="ready", checks=checks)), 200

    log.warning("readiness.unavailable", extra={"down": ",".join(down)})
    return _uncached(
        jsonify(
            status="unavailable",
            reason="dependency_unavailable",
            down=down,
            checks=checks,
            message=f"Not ready: {', '.join(down)} did not answer.",
        )
    ), 503
