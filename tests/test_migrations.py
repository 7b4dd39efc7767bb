"""Alembic migrations: the release step builds the schema the models describe."""

from __future__ import annotations

import psycopg2
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import make_url

from hookline.db import driver_url
from hookline.models import Base
from tests.conftest import ADMIN_DATABASE_URL, ROOT, migrate, new_database_name


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url)
    config.attributes["configure_logger"] = False
    return config


def schema(url: str) -> dict[str, set[str]]:
    engine = create_engine(driver_url(url))
    try:
        inspector = inspect(engine)
        return {
            table: {column["name"] for column in inspector.get_columns(table)}
            for table in inspector.get_table_names()
            if table != "alembic_version"
        }
    finally:
        engine.dispose()


MODEL_SCHEMA = {
    table.name: {column.name for column in table.columns}
    for table in Base.metadata.sorted_tables
}


@pytest.fixture
def fresh_postgres() -> str:
    name = new_database_name("migrate")
    admin = psycopg2.connect(ADMIN_DATABASE_URL)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    url = make_url(ADMIN_DATABASE_URL).set(database=name)
    yield url.render_as_string(hide_password=False)
    with admin.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def test_upgrade_builds_the_models_schema_on_postgresql(fresh_postgres) -> None:
    migrate(fresh_postgres)

    assert schema(fresh_postgres) == MODEL_SCHEMA


def test_upgrade_is_idempotent_and_downgrade_empties(fresh_postgres) -> None:
    migrate(fresh_postgres)
    migrate(fresh_postgres)
    command.downgrade(alembic_config(fresh_postgres), "base")

    assert schema(fresh_postgres) == {}


def test_upgrade_builds_the_schema_on_the_sqlite_default(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'hookline.sqlite3'}"
    migrate(url)

    assert schema(url) == MODEL_SCHEMA


def test_upgrade_from_the_previous_revision_keeps_the_rows(fresh_postgres) -> None:
    config = alembic_config(fresh_postgres)
    command.upgrade(config, "0001")
    engine = create_engine(driver_url(fresh_postgres))
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO deliveries (delivery_id, event, verdict, reason, created_at,"
            " updated_at) VALUES ('d-1', 'issues', 'ignored', 'kept', now(), now())"
        )

    command.upgrade(config, "head")

    with engine.connect() as connection:
        reason = connection.exec_driver_sql(
            "SELECT reason FROM deliveries WHERE delivery_id = 'd-1'"
        ).scalar_one()
    engine.dispose()
    assert reason == "kept"
    assert schema(fresh_postgres) == MODEL_SCHEMA
