"""Fixtures shared by the job-store tests (each module defines its own ``db_url``)."""

from __future__ import annotations

import pytest

from fluxserve.jobs.database import open_database


@pytest.fixture
def open_db(db_url):
    """open_database(db_url), callable several times (a 'restart'); engines are disposed after."""
    opened = []

    def _open():
        sessions = open_database(db_url)
        opened.append(sessions)
        return sessions

    yield _open
    for sessions in opened:
        sessions.kw["bind"].dispose()
