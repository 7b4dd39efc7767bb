"""gunicorn's settings for the gateway (`gunicorn -c config/gunicorn.py ...`)."""

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

# Heroku and honcho hand each process its port in $PORT.
bind = f"{os.environ.get('WEB_HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"  # noqa: S104
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Threads, so that a client trickling its body ties up one thread, not a whole
# worker; in production a buffering proxy in front takes that load entirely.
worker_class = "gthread"
threads = int(os.environ.get("WEB_THREADS", "8"))
timeout = 30
graceful_timeout = 10
# Each gunicorn would otherwise share one control socket under ~/.gunicorn.
control_socket_disable = True
accesslog = "-" if os.environ.get("WEB_ACCESS_LOG") else None


# Without a shared metrics directory each worker counts alone and /metrics shows
# whichever worker answers: when PROMETHEUS_MULTIPROC_DIR is not set, the master
# makes a directory of its own (named so, since a reload re-reads this module).
_OWN_METRICS_DIR_PREFIX = "hookline-web-metrics-"


def on_starting(server: object) -> None:
    """Refuse to start without the webhook secret, in one sentence, before forking.

    Then empty the metrics directory of an earlier run's files.
    """
    from config.settings import ConfigError, load_settings

    try:
        load_settings().require_webhook_secret()
    except ConfigError as exc:
        print(f"hookline gateway: {exc}", file=sys.stderr)
        raise SystemExit(3) from None

    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        # Set before the first fork, so every worker inherits it.
        directory = tempfile.mkdtemp(prefix=_OWN_METRICS_DIR_PREFIX)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    # An earlier run's files would add its counts to this one's. The master
    # writes no metrics (nor imports them: redis alone is 18 MiB here).
    Path(directory).mkdir(parents=True, exist_ok=True)
    for stale in Path(directory).glob("*.db"):
        stale.unlink(missing_ok=True)


def child_exit(server: object, worker: Any) -> None:
    """Take an exited worker out of the live gauges; its counts stay."""
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(worker.pid)


def on_exit(server: object) -> None:
    """Remove the metrics directory if on_starting made it."""
    path = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR", ""))
    if path.name.startswith(_OWN_METRICS_DIR_PREFIX):
        shutil.rmtree(path, ignore_errors=True)
