"""Engine creation for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, DefaultClause, Engine, Result, TextClause, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from fluxserve.jobs.tables import Base


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers don't block the writer
    cursor.execute("PRAGMA synchronous=FULL")  # a committed job survives power loss
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE matched. ``Session.execute`` is typed to return a plain Result,
    but for those statements it is a CursorResult, which carries the count."""
    return cast("CursorResult[Any]", result).rowcount


def open_database(url: str) -> sessionmaker[Session]:
    """Create the engine, the tables if missing, and return a session factory."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine: Engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        if parsed.drivername == "postgresql":  # plain URL -> the psycopg 3 driver we depend on
            parsed = parsed.set(drivername="postgresql+psycopg")
        engine = create_engine(parsed, pool_pre_ping=True)
    Base.metadata.create_all(engine)
    upgrade_schema(engine)
    return sessionmaker(engine, expire_on_commit=False)


def upgrade_schema(engine: Engine) -> list[str]:
    """Add columns that newer versions define to tables an older version created. New columns
    are always nullable or carry a server default, so existing rows stay valid."""
    added: list[str] = []
    existing_tables = set(inspect(engine).get_table_names())
    with engine.begin() as connection:
        for table in Base.metadata.sorted_tables:
            if table.name not in existing_tables:
                continue
            present = {column["name"] for column in inspect(connection).get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                ddl = f"ALTER TABLE {table.name} ADD COLUMN {column.name} {column.type.compile(engine.dialect)}"
                default = column.server_default
                if default is not None:
                    # the only server defaults tables.py declares are text(...) clauses
                    assert isinstance(default, DefaultClause) and isinstance(default.arg, TextClause), default
                    ddl += f" DEFAULT {default.arg.text}"
                connection.exec_driver_sql(ddl)
                added.append(f"{table.name}.{column.name}")
            present_indexes = {index["name"] for index in inspect(connection).get_indexes(table.name)}
            for index in table.indexes:
                if index.name not in present_indexes:
                    assert index.name is not None  # index=True columns are named by the "ix_" naming convention
                    index.create(connection)
                    added.append(index.name)
    return added
