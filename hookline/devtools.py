"""Tools for running Hookline on one machine: a throwaway App key, signed sends."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from webhook_gateway.app import EVENTS_PATH
from webhook_gateway.signature import sign


def generate_app_key(folder: Path) -> tuple[Path, bytes]:
    """Write a new RSA private key for a pretend App; return its path and public PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = folder / "github-app.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return path, public


def free_port() -> int:
    """Return a TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def send_delivery(
    gateway_url: str,
    secret: str,
    event: str,
    body: bytes,
    delivery_id: str | None = None,
    timeout: float = 10.0,
) -> requests.Response:
    """POST `body` to the gateway signed and labelled the way GitHub sends it."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "GitHub-Hookshot/hookline-dev",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery_id or str(uuid.uuid4()),
        "X-Hub-Signature-256": sign(secret.encode(), body),
    }
    return requests.post(
        gateway_url.rstrip("/") + EVENTS_PATH,
        data=body,
        headers=headers,
        timeout=timeout,
    )
