"""A fresh Prefect home's database, written from a stored schema instead of migrated.

Prefect's temporary server creates its SQLite database on its first start by running all of its
Alembic migrations (114 for 3.8.8): 10 s of a 15 s start on this 2-core machine, which a cold run
waits for. The result of those migrations is the same for every home of one Prefect version, so
`prefect-<version>.sql` holds it (Python's sqlite3 dump of a database just migrated by Prefect's
own `create_db`), and a home without a database gets it in ~50 ms. The server's own migration
check then finds the database at Alembic's head and does nothing. Another Prefect version, or a
database the user has configured elsewhere, is left to Prefect.

`python -m mmdiag.flows.hosting.prefect_db` writes the schema for the installed Prefect; a test checks that the
stored one equals a fresh migration.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

URL_SETTINGS = ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL")


def schema_path(prefect_version: str | None = None) -> Path:
    return Path(__file__).with_name(f"prefect-{prefect_version or version('prefect')}.sql")


def seed(home: Path) -> bool:
    """Write the stored schema as `home`'s database when the home has none and its server would
    use the default SQLite file there; True if it was written."""
    db, schema = home / "prefect.db", schema_path()
    if db.exists() or not schema.exists() or any(os.environ.get(k) for k in URL_SETTINGS) or (home / "profiles.toml").exists():
        return False
    with tempfile.TemporaryDirectory(dir=home) as tmp:
        part = Path(tmp) / "prefect.db"
        with sqlite3.connect(part) as connection:
            connection.executescript(schema.read_text())
        connection.close()
        try:
            os.link(part, db)  # atomic, and never over a database another run created meanwhile
        except OSError:  # one created meanwhile, or a file system without hard links: Prefect migrates
            return False
    return True


def migrate(home: Path) -> Path:
    """`home`'s database created by Prefect's own migrations, as its server does on a first start
    (in a child process: Prefect reads its settings at import)."""
    env = {k: v for k, v in os.environ.items() if k not in URL_SETTINGS} | {"PREFECT_HOME": str(home)}
    code = "import asyncio; from prefect.server.database import provide_database_interface as db; asyncio.run(db().create_db())"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    return home / "prefect.db"


def migrated_dump() -> str:
    with tempfile.TemporaryDirectory() as home:
        with sqlite3.connect(migrate(Path(home))) as connection:
            dump = "\n".join(connection.iterdump()) + "\n"
        connection.close()
        return dump


def schema(db: Path) -> list[tuple]:
    """Every object of a database's schema and its Alembic revision. A table's definition is
    compared as a set of lines: Prefect's migrations rebuild SQLite tables with their constraints
    in an order that changes from run to run."""
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name").fetchall()
        revision = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    connection.close()
    lines = lambda sql: sorted(line.strip().rstrip(",").strip() for line in (sql or "").splitlines())  # noqa: E731
    return [(kind, name, table, lines(sql)) for kind, name, table, sql in rows] + [("alembic", revision)]


if __name__ == "__main__":
    path = schema_path()
    path.write_text(migrated_dump())
    print(path)
