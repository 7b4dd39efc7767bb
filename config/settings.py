"""Hookline's settings: defaults in code, then a test mapping, then the environment."""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

DEFAULT_DATABASE_URL = "sqlite:///hookline.sqlite3"


class ConfigError(RuntimeError):
    """A setting is missing or malformed; the message names the variable."""


def _flag(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false, not {raw!r}.")


def _number(name: str, raw: str, kind: type[int] | type[float]) -> int | float:
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {raw!r}.") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number, not negative.")
    return value


@dataclass(frozen=True)
class Settings:
    """Every knob Hookline reads, named as the environment variable that sets it."""

    GITHUB_APP_WEBHOOK_SECRET: str = ""
    # The secret being rotated out: deliveries signed with it are still taken.
    GITHUB_APP_WEBHOOK_SECRET_PREVIOUS: str = ""
    GITHUB_WEBHOOKS_ENABLED: bool = True
    GITHUB_APP_ID: str = ""
    GITHUB_APP_PRIVATE_KEY_PATH: str = ""
    GITHUB_APP_PRIVATE_KEY: str = ""
    GITHUB_API_URL: str = "https://api.github.com"
    REDIS_URL: str = "redis://127.0.0.1:6379/0"
    CELERY_BROKER_URL: str = ""
    DATABASE_URL: str = DEFAULT_DATABASE_URL
    OH_LABEL: str = "openhands"
    INLINE_OH_LABEL: str = "@openhands"
    HOOKLINE_RUNTIME: str = "command"
    HOOKLINE_AGENT_COMMAND: str = ""
    OPENHANDS_URL: str = ""
    OPENHANDS_API_KEY: str = ""
    OPENHANDS_POLL_INTERVAL: float = 1.0
    OPENHANDS_POLL_MAX_INTERVAL: float = 15.0
    HOOKLINE_AGENT_TIMEOUT: float = 900.0
    HOOKLINE_TEMPLATES_DIR: str = ""
    HOOKLINE_MAX_BODY_BYTES: int = 25 * 1024 * 1024
    HOOKLINE_DELIVERY_TTL: int = 3 * 24 * 3600
    # The inbox keeps bodies this long; ids (and so replay protection) for good.
    HOOKLINE_INBOX_RETENTION: int = 14 * 24 * 3600
    # A delivery still unclassified after this long is queued again from the inbox.
    HOOKLINE_INBOX_REQUEUE_AFTER: int = 120
    HOOKLINE_BODY_TTL: int = 60
    HOOKLINE_GITHUB_TIMEOUT: float = 10.0
    HOOKLINE_RETRY_BASE: float = 1.0
    HOOKLINE_RETRY_MAX_DELAY: float = 300.0
    HOOKLINE_MAX_RETRIES: int = 8
    HOOKLINE_LEASE_SECONDS: int = 60
    HOOKLINE_REDELIVERY_MAX_PER_RUN: int = 20
    CELERY_VISIBILITY_TIMEOUT: int = 1800
    CELERY_BROKER_KEYPREFIX: str = ""
    HOOKLINE_REDIS_PREFIX: str = "hookline:"
    # Outgoing status webhooks: space-separated URLs, their secret, and batching.
    HOOKLINE_STATUS_WEBHOOK_URLS: str = ""
    HOOKLINE_STATUS_WEBHOOK_SECRET: str = ""
    HOOKLINE_STATUS_WEBHOOK_BATCH_SIZE: int = 50
    HOOKLINE_STATUS_WEBHOOK_BATCH_DELAY: float = 5.0
    HOOKLINE_STATUS_WEBHOOK_ATTEMPTS: int = 4
    # The gateway's doors: source networks let in (empty: any), proxies in front
    # whose X-Forwarded-For is believed, and requests per minute per source and
    # per installation (0: no limit).
    HOOKLINE_ALLOWED_SOURCES: str = ""
    HOOKLINE_TRUSTED_PROXIES: int = 0
    HOOKLINE_SOURCE_RATE_LIMIT: int = 0
    HOOKLINE_INSTALLATION_RATE_LIMIT: int = 0
    LOG_LEVEL: str = "INFO"
    LOG_FORMAT: str = "auto"
    # Prometheus: a bearer token for /metrics (empty: open), and a pool's own port.
    HOOKLINE_METRICS_TOKEN: str = ""
    HOOKLINE_WORKER_METRICS_PORT: int = 0
    # All interfaces by default: Prometheus scrapes the pools from elsewhere.
    HOOKLINE_WORKER_METRICS_HOST: str = "0.0.0.0"  # noqa: S104

    @property
    def broker_url(self) -> str:
        """Return the Celery broker, which defaults to the Redis that Hookline uses."""
        return self.CELERY_BROKER_URL or self.REDIS_URL

    @property
    def bot_handle(self) -> str:
        """Return the mention that asks for a job, with its leading @."""
        handle = self.INLINE_OH_LABEL.strip()
        return handle if handle.startswith("@") else f"@{handle}"

    def require_webhook_secret(self) -> bytes:
        """Return the webhook secret, or refuse to go on without one."""
        if not self.GITHUB_APP_WEBHOOK_SECRET:
            raise ConfigError(
                "GITHUB_APP_WEBHOOK_SECRET is not set: the gateway cannot verify "
                "GitHub's signatures without the App's webhook secret."
            )
        return self.GITHUB_APP_WEBHOOK_SECRET.encode()

    def webhook_secrets(self) -> tuple[bytes, ...]:
        """Return the webhook secrets a signature may use: current, then previous."""
        current = self.require_webhook_secret()
        previous = self.GITHUB_APP_WEBHOOK_SECRET_PREVIOUS.encode()
        return (current, previous) if previous else (current,)

    def allowed_sources(
        self,
    ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """Return the networks deliveries may come from; empty means any."""
        networks = []
        for text in self.HOOKLINE_ALLOWED_SOURCES.replace(",", " ").split():
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise ConfigError(
                    f"HOOKLINE_ALLOWED_SOURCES: {text!r} is not a network such as "
                    "140.82.112.0/20."
                ) from None
        return tuple(networks)

    def require_app_credentials(self) -> tuple[str, str]:
        """Return the App id and private key PEM, or say which variable is missing."""
        if not self.GITHUB_APP_ID:
            raise ConfigError(
                "GITHUB_APP_ID is not set: workers need the GitHub App's id to mint "
                "installation tokens."
            )
        if self.GITHUB_APP_PRIVATE_KEY:
            return self.GITHUB_APP_ID, self.GITHUB_APP_PRIVATE_KEY
        if not self.GITHUB_APP_PRIVATE_KEY_PATH:
            raise ConfigError(
                "GITHUB_APP_PRIVATE_KEY_PATH (or GITHUB_APP_PRIVATE_KEY) is not set: "
                "workers need the App's private key to sign its JWT."
            )
        path = Path(self.GITHUB_APP_PRIVATE_KEY_PATH)
        try:
            return self.GITHUB_APP_ID, path.read_text()
        except OSError as exc:
            raise ConfigError(
                f"GITHUB_APP_PRIVATE_KEY_PATH={path} cannot be read: {exc.strerror}."
            ) from None


def load_settings(
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Build settings from defaults, then `overrides`, then the environment."""
    environ = os.environ if environ is None else environ
    values: dict[str, object] = dict(overrides or {})
    for field in fields(Settings):
        raw = environ.get(field.name)
        if raw is None or raw == "":
            continue
        if field.type == "bool":
            values[field.name] = _flag(field.name, raw)
        elif field.type in {"int", "float"}:
            kind = int if field.type == "int" else float
            values[field.name] = _number(field.name, raw, kind)
        else:
            values[field.name] = raw
    return Settings(**values)  # type: ignore[arg-type]
