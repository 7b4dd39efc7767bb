"""A Flask app served on a loopback port from a background thread.

The fakes of GitHub and OpenHands that tests and the demo run are built on it;
it refuses any address that is not loopback, so no fake ever listens outside.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from typing import Self

from flask import Flask
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

log = logging.getLogger(__name__)

# How often the serving thread checks for shutdown; stop() waits at most this.
POLL_INTERVAL_SECONDS = 0.05


def require_loopback(host: str, who: str = "a loopback server") -> None:
    """Raise ValueError unless `host` is localhost or a loopback address."""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"{who} listens on loopback only, not on {host!r}")


class _QuietRequestHandler(WSGIRequestHandler):
    """Keep werkzeug's access log out of test output; requests are recorded."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Skip the per-request access log line."""


class LoopbackServer:
    """Serve `self.app` on a loopback port; subclasses build the app.

    `name` names the server in errors, log lines and the thread.
    """

    name = "loopback-server"
    app: Flask

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        require_loopback(host, type(self).__name__)
        self._host = host
        self._port = port
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Bind the port and serve in a background thread."""
        if self._server is not None:
            raise RuntimeError(f"{type(self).__name__} is already running")
        self._server = make_server(
            self._host,
            self._port,
            self.app,
            threaded=True,
            request_handler=_QuietRequestHandler,
        )
        # A short poll lets stop() return in milliseconds rather than half a second.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": POLL_INTERVAL_SECONDS},
            name=self.name,
            daemon=True,
        )
        self._thread.start()
        log.info("loopback.started", extra={"server": self.name, "url": self.url})
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None
        log.info("loopback.stopped", extra={"server": self.name})

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Return the base URL, e.g. http://127.0.0.1:54321."""
        if self._server is None:
            raise RuntimeError(
                f"{type(self).__name__} is not running; call start() first"
            )
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._server.server_port}"
