"""gunicorn's settings for the gateway (`gunicorn -c config/gunicorn.py ...`)."""

import os
import sys

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


def on_starting(server: object) -> None:
    """Refuse to start without the webhook secret, in one sentence, before forking."""
    from config.settings import ConfigError, load_settings

    try:
        load_settings().require_webhook_secret()
    except ConfigError as exc:
        print(f"hookline gateway: {exc}", file=sys.stderr)
        raise SystemExit(3) from None
