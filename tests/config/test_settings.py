"""Pin the settings layers and the sentences that name a missing variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.settings import ConfigError, Settings, load_settings
from webhook_gateway.app import create_app


def test_default_applies_without_override_or_environment() -> None:
    assert load_settings(environ={}).OH_LABEL == "openhands"


def test_override_beats_default() -> None:
    settings = load_settings(environ={}, overrides={"OH_LABEL": "from-test"})

    assert settings.OH_LABEL == "from-test"


def test_environment_beats_override() -> None:
    settings = load_settings(
        environ={"OH_LABEL": "from-env"}, overrides={"OH_LABEL": "from-test"}
    )

    assert settings.OH_LABEL == "from-env"


def test_empty_environment_value_counts_as_unset() -> None:
    settings = load_settings(
        environ={"OH_LABEL": ""}, overrides={"OH_LABEL": "from-test"}
    )

    assert settings.OH_LABEL == "from-test"


def test_process_environment_is_read_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OH_LABEL", "from-process")

    assert load_settings().OH_LABEL == "from-process"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("false", False),
        ("False", False),
        ("0", False),
    ],
)
def test_bool_is_parsed_from_environment(raw: str, expected: bool) -> None:
    settings = load_settings(environ={"GITHUB_WEBHOOKS_ENABLED": raw})

    assert settings.GITHUB_WEBHOOKS_ENABLED is expected


def test_bad_bool_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="GITHUB_WEBHOOKS_ENABLED"):
        load_settings(environ={"GITHUB_WEBHOOKS_ENABLED": "maybe"})


def test_numbers_are_parsed_to_their_field_type() -> None:
    settings = load_settings(
        environ={"HOOKLINE_AGENT_TIMEOUT": "2.5", "HOOKLINE_MAX_RETRIES": "3"}
    )

    assert settings.HOOKLINE_AGENT_TIMEOUT == 2.5
    assert settings.HOOKLINE_MAX_RETRIES == 3
    assert isinstance(settings.HOOKLINE_MAX_RETRIES, int)


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("HOOKLINE_AGENT_TIMEOUT", "-1"),
        ("HOOKLINE_MAX_RETRIES", "-3"),
        ("HOOKLINE_AGENT_TIMEOUT", "ten"),
        ("HOOKLINE_MAX_RETRIES", "many"),
        ("HOOKLINE_MAX_RETRIES", "2.5"),
    ],
)
def test_bad_number_names_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings(environ={name: raw})


@pytest.mark.parametrize("name", ["HOOKLINE_AGENT_TIMEOUT", "HOOKLINE_RETRY_MAX_DELAY"])
def test_nan_is_not_accepted_as_a_number(name: str) -> None:
    # float("nan") parses and is not negative; a NaN timeout never expires and a
    # NaN cap never caps (min(delay, nan) is delay).
    with pytest.raises(ConfigError, match=name):
        load_settings(environ={name: "nan"})


def test_missing_webhook_secret_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="GITHUB_APP_WEBHOOK_SECRET"):
        load_settings(environ={}).require_webhook_secret()


def test_webhook_secret_is_returned_as_bytes() -> None:
    settings = load_settings(environ={"GITHUB_APP_WEBHOOK_SECRET": "s3cret"})

    assert settings.require_webhook_secret() == b"s3cret"


def test_missing_app_id_is_named_first() -> None:
    with pytest.raises(ConfigError, match="GITHUB_APP_ID"):
        load_settings(environ={}).require_app_credentials()


def test_missing_private_key_path_is_named_once_app_id_is_set() -> None:
    settings = load_settings(environ={"GITHUB_APP_ID": "31337"})

    with pytest.raises(ConfigError, match="GITHUB_APP_PRIVATE_KEY_PATH"):
        settings.require_app_credentials()


def test_private_key_is_read_from_the_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "app.pem"
    key_file.write_text("-----BEGIN PRIVATE KEY-----\nabc\n")
    settings = load_settings(
        environ={"GITHUB_APP_ID": "31337", "GITHUB_APP_PRIVATE_KEY_PATH": str(key_file)}
    )

    assert settings.require_app_credentials() == (
        "31337",
        "-----BEGIN PRIVATE KEY-----\nabc\n",
    )


def test_unreadable_private_key_path_names_the_variable(tmp_path: Path) -> None:
    settings = load_settings(
        environ={
            "GITHUB_APP_ID": "31337",
            "GITHUB_APP_PRIVATE_KEY_PATH": str(tmp_path / "missing.pem"),
        }
    )

    with pytest.raises(ConfigError, match="GITHUB_APP_PRIVATE_KEY_PATH"):
        settings.require_app_credentials()


def test_broker_defaults_to_redis_url() -> None:
    settings = load_settings(environ={"REDIS_URL": "redis://127.0.0.1:6379/3"})

    assert settings.broker_url == "redis://127.0.0.1:6379/3"


def test_explicit_broker_beats_redis_url() -> None:
    settings = load_settings(
        environ={
            "REDIS_URL": "redis://127.0.0.1:6379/3",
            "CELERY_BROKER_URL": "redis://127.0.0.1:6379/4",
        }
    )

    assert settings.broker_url == "redis://127.0.0.1:6379/4"


@pytest.mark.parametrize(
    ("label", "handle"),
    [("openhands", "@openhands"), ("@openhands", "@openhands"), (" bot ", "@bot")],
)
def test_bot_handle_has_one_leading_at(label: str, handle: str) -> None:
    assert Settings(INLINE_OH_LABEL=label).bot_handle == handle


def test_gateway_refuses_to_start_without_webhook_secret() -> None:
    with pytest.raises(ConfigError, match="GITHUB_APP_WEBHOOK_SECRET"):
        create_app(load_settings(environ={}))
