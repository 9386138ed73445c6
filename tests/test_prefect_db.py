"""A fresh Prefect home gets its database from the stored schema, equal to Prefect's own migrations."""

import sqlite3

import httpx
import pytest

from mmdiag.flows.hosting import prefect_db
from mmdiag.flows.hosting.server import TemporaryServer


def test_the_installed_prefect_has_a_stored_schema():
    assert prefect_db.schema_path().exists(), "run `python -m mmdiag.flows.hosting.prefect_db` after changing Prefect's version"


def test_seed_writes_a_database_only_where_a_fresh_home_would_migrate(tmp_path, monkeypatch):
    for key in prefect_db.URL_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    assert prefect_db.seed(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["prefect.db"]  # nothing half-written beside it
    (revision,) = sqlite3.connect(tmp_path / "prefect.db").execute("SELECT version_num FROM alembic_version").fetchone()
    assert revision in prefect_db.schema_path().read_text()
    assert not prefect_db.seed(tmp_path)  # a home that has a database keeps it

    other = tmp_path / "configured"
    other.mkdir()
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "postgresql+asyncpg://db/prefect")
    assert not prefect_db.seed(other)  # the user's own database: Prefect's business
    monkeypatch.delenv("PREFECT_API_DATABASE_CONNECTION_URL")
    (other / "profiles.toml").write_text("")
    assert not prefect_db.seed(other)  # a profile may point elsewhere
    (other / "profiles.toml").unlink()
    monkeypatch.setattr(prefect_db, "version", lambda _: "0.0.0")
    assert not prefect_db.seed(other)  # another Prefect: its own migrations
    assert not (other / "prefect.db").exists()


@pytest.mark.slow
def test_the_stored_schema_is_what_prefects_migrations_create(tmp_path):
    (tmp_path / "migrated").mkdir()
    (tmp_path / "seeded").mkdir()
    migrated = prefect_db.migrate(tmp_path / "migrated")
    assert prefect_db.seed(tmp_path / "seeded")
    assert prefect_db.schema(tmp_path / "seeded" / "prefect.db") == prefect_db.schema(migrated)


@pytest.mark.slow
def test_the_temporary_server_starts_on_a_seeded_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    server = TemporaryServer()
    server._launch()
    try:
        assert (tmp_path / "prefect.db").exists()
        url = server.wait(timeout=60)
        created = httpx.post(f"{url}/flows/", json={"name": "seeded"}, timeout=10)
        assert created.status_code == 201, created.text
        assert httpx.post(f"{url}/flows/filter", json={}, timeout=10).json()[0]["name"] == "seeded"
    finally:
        server.stop()
