"""The fake GitHub as a WSGI app, for gunicorn to serve with keep-alive.

`python -m hookline.fake_github` serves it with Werkzeug's development server,
which closes every connection: each GitHub call would then pay a TCP handshake
and a thread of its own, costs the real GitHub does not impose on the pools. One
gunicorn worker keeps the fake's state in one process.
"""

from __future__ import annotations

import os
from pathlib import Path

from hookline.fake_github import FakeGitHub

fake = FakeGitHub(
    app_id=os.environ["BENCH_FAKE_APP_ID"],
    public_key_pem=Path(os.environ["BENCH_FAKE_PUBLIC_KEY"]).read_bytes(),
)
app = fake.app
