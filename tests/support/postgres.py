"""A real, throwaway PostgreSQL server for tests.

Uses the server binaries of Debian's `postgresql` package (/usr/lib/postgresql/<ver>/bin).
The cluster listens only on 127.0.0.1 (plus a unix socket inside its own directory), trusts
loopback connections, runs with fsync off, and is stopped with `pg_ctl -m immediate stop`.
PostgreSQL refuses to run as root, so under root every server command runs as the
unprivileged `postgres` system user (created by the Debian package) via `runuser`.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SERVER_USER = "postgres"  # the unprivileged system user to run as when we are root
DATABASE = "fluxserve_test"
REQUIRE_ENV = "FLUXSERVE_REQUIRE_POSTGRES"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries (or no user to run them as) on this machine."""


def postgres_required() -> bool:
    """CI sets FLUXSERVE_REQUIRE_POSTGRES=1: a missing server is then a failure, not a skip."""
    return os.environ.get(REQUIRE_ENV, "") == "1"


def find_bindir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl."""
    candidates = [
        Path(d) for d in glob.glob("/usr/lib/postgresql/*/bin")
        if Path(d, "initdb").exists() and Path(d, "pg_ctl").exists()
    ]
    if not candidates:
        raise PostgresUnavailable(
            "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin "
            "(install them with: apt-get install -y postgresql)"
        )
    return max(candidates, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresCluster:
    """A running throwaway cluster: ``url`` (of database ``fluxserve_test``), and ``stop()`` /
    ``start()`` to take the server away and bring it back (fault tests)."""

    def __init__(self, run, pg_ctl: Path, data: Path, log: Path, url: str):
        self._run, self._pg_ctl, self._data, self._log, self.url = run, pg_ctl, data, log, url

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server (``immediate``: as if it crashed; committed work survives only on a
        ``durable`` cluster, the default one runs with fsync off)."""
        self._run(str(self._pg_ctl), "-D", str(self._data), "-m", mode, "-w", "stop")

    def start(self) -> None:
        self._run(str(self._pg_ctl), "-D", str(self._data), "-l", str(self._log), "-w", "-t", "60", "start")


@contextmanager
def running_postgres(tmp_dir: Path | str) -> Iterator[str]:
    """Start a fresh cluster, create database `fluxserve_test`, yield its SQLAlchemy URL
    (postgresql://postgres@127.0.0.1:PORT/fluxserve_test), and stop the cluster afterwards."""
    with postgres_cluster(tmp_dir) as cluster:
        yield cluster.url


@contextmanager
def postgres_cluster(tmp_dir: Path | str, *, durable: bool = False) -> Iterator[PostgresCluster]:
    """Start a fresh cluster, create database `fluxserve_test`, yield it (``PostgresCluster``),
    and stop and remove it afterwards. Fast and throwaway (fsync off) unless ``durable``: a
    fault test that crashes the server and expects committed rows back needs it durable.

    Raises PostgresUnavailable when the server binaries or the `postgres` user are missing.
    As root, the cluster lives in a new directory under the system temp dir (pytest's
    tmp dirs are private to root, so the `postgres` user could not reach them) that is
    removed at the end; otherwise it lives in `tmp_dir`.
    """
    bindir = find_bindir()
    as_root = os.geteuid() == 0
    if as_root:
        try:
            user = pwd.getpwnam(SERVER_USER)
        except KeyError:
            raise PostgresUnavailable(f"running as root but there is no '{SERVER_USER}' user") from None
        base = Path(tempfile.mkdtemp(prefix="fluxserve-pg-"))
        os.chown(base, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", SERVER_USER, "--"]
    else:
        base = Path(tempfile.mkdtemp(prefix="pg-", dir=tmp_dir))
        prefix = []

    data, sock_dir, log = base / "data", base / "sock", base / "server.log"

    def run(*args: str) -> None:
        result = subprocess.run(
            [*prefix, *args], cwd=base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        if result.returncode != 0:
            log_tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed:\n{result.stdout}\n{log_tail}")

    try:
        sock_dir.mkdir()
        if as_root:
            os.chown(sock_dir, user.pw_uid, user.pw_gid)
        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync")
        port = _free_port()
        # Files that already exist keep their owner (the server user) when root rewrites them.
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{sock_dir}'\n"
                "max_connections = 200\n"
            )
            if not durable:
                conf.write("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
        (data / "pg_hba.conf").write_text("local all all trust\nhost  all all 127.0.0.1/32 trust\n")
        cluster = PostgresCluster(run, bindir / "pg_ctl", data, log, f"postgresql://postgres@127.0.0.1:{port}/{DATABASE}")
        cluster.start()
        import psycopg  # here, not at import: the GPU run's tests have no psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        yield cluster
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           cwd=base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if as_root:
            shutil.rmtree(base, ignore_errors=True)


def create_database(url: str, name: str) -> str:
    """Create database `name` on the server of `url` and return the URL pointing at it."""
    import psycopg

    server, _, _ = url.rpartition("/")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    return f"{server}/{name}"
