"""The Procfile's `flower` process: basic auth from the environment, or no start.

Flower runs as a real process on loopback against Redis database 12, which no
worker reads.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests
from honcho.environ import parse_procfile

from config.settings import load_settings
from hookline.devtools import free_port
from tests.conftest import ROOT
from workers.celery_app import create_celery

BROKER_URL = "redis://127.0.0.1:6379/12"
CREDENTIALS = "operator:flower-test-password"
START_WITHIN = 8.0


def flower_command() -> str:
    """Return the Procfile's `flower` command, as honcho and the platform read it."""
    procfile = parse_procfile((ROOT / "Procfile").read_text())
    return procfile.processes["flower"]


def flower_environment(port: int, **extra: str) -> dict[str, str]:
    inherited = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("FLOWER_", "CELERY_", "REDIS_"))
    }
    return {
        **inherited,
        # The Procfile names a bare `celery`, as the Makefile's PATH provides it.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PORT": str(port),
        "FLOWER_ADDRESS": "127.0.0.1",
        "CELERY_BROKER_URL": BROKER_URL,
        "REDIS_URL": BROKER_URL,
        **extra,
    }


@contextmanager
def flower(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """Run the Procfile's flower line through a shell, as honcho does; stop it."""
    with log.open("w") as output:
        process = subprocess.Popen(
            ["/bin/sh", "-c", flower_command()],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)


def wait_for_http(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_WITHIN
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"flower exited early:\n{log.read_text()}")
        try:
            requests.get(url, timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise AssertionError(f"flower did not listen within {START_WITHIN} s")


def test_flower_asks_for_the_configured_basic_auth(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "flower.log"
    env = flower_environment(port, FLOWER_BASIC_AUTH=CREDENTIALS)

    with flower(env, log) as process:
        wait_for_http(f"{url}/healthcheck", process, log)
        probe = requests.get(f"{url}/healthcheck", timeout=5)
        anonymous = requests.get(f"{url}/workers", timeout=5)
        wrong = requests.get(f"{url}/workers", auth=("operator", "guess"), timeout=5)
        user, password = CREDENTIALS.split(":")
        signed_in = requests.get(f"{url}/workers", auth=(user, password), timeout=5)

    assert probe.status_code == 200
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic")
    assert wrong.status_code == 401
    assert signed_in.status_code == 200
    logged = log.read_text()
    assert CREDENTIALS.split(":")[1] not in logged
    assert base64.b64encode(CREDENTIALS.encode()).decode() not in logged


def test_flower_refuses_to_start_without_basic_auth(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "flower.log"

    with flower(flower_environment(port), log) as process:
        returncode = process.wait(timeout=5)

    assert returncode != 0
    assert "FLOWER_BASIC_AUTH" in log.read_text()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_workers_send_the_events_flower_shows() -> None:
    conf = create_celery(load_settings(environ={})).conf

    assert conf.worker_send_task_events is True
    assert conf.task_send_sent_event is True
