"""gunicorn's settings for the gateway (`gunicorn -c config/gunicorn.py ...`)."""

import os

# Heroku and honcho hand each process its port in $PORT.
bind = f"{os.environ.get('WEB_HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"  # noqa: S104
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "sync"
# GitHub waits 10 s for an answer; a request stuck longer is a bug to surface.
timeout = 10
graceful_timeout = 10
accesslog = "-" if os.environ.get("WEB_ACCESS_LOG") else None
