"""The ceiling: a Flask app that answers 200 to the gateway's route and does nothing.

Served by gunicorn with the gateway's own configuration (config/gunicorn.py), so
the two differ only in what the view does.
"""

from __future__ import annotations

from flask import Flask

from webhook_gateway.app import EVENTS_PATH

app = Flask(__name__)


@app.post(EVENTS_PATH)
def receive_delivery() -> tuple[str, int]:
    """Answer 200 without reading the body (gunicorn drains it for keep-alive)."""
    return "ok", 200
