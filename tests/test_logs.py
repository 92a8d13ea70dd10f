"""Log output: readable lines by default, one JSON object per line with FLUXSERVE_LOG_FORMAT=json."""

from __future__ import annotations

import json
import logging

import pytest

from fluxserve.config import Settings
from fluxserve.dependencies import Dependency, Health
from fluxserve.logs import configure


@pytest.fixture(autouse=True)
def _restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines(capsys):
    configure("INFO", "json")
    logging.getLogger("fluxserve.test").warning("disk unavailable: %s", "full")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    record = json.loads(line)
    assert record["message"] == "disk unavailable: full" and record["level"] == "WARNING"
    assert record["name"] == "fluxserve.test" and "time" in record and isinstance(record["process"], int)


def test_text_lines(capsys):
    configure("INFO", "text")
    logging.getLogger("fluxserve.test").info("hello")
    assert capsys.readouterr().err.rstrip().endswith("fluxserve.test: hello")


def test_the_format_is_a_checked_setting():
    assert Settings(log_format="json").log_format == "json"
    with pytest.raises(ValueError):
        Settings(log_format="xml")


def test_an_outage_is_two_lines_however_often_it_is_seen(caplog):
    health = Health()
    with caplog.at_level(logging.INFO):
        for _ in range(50):
            health.down(Dependency.DATABASE, "connection refused")
        assert health.degraded and health.snapshot()["database"]["reason"] == "connection refused"
        for _ in range(5):
            health.up(Dependency.DATABASE)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith("database unavailable: connection refused") and messages[1].startswith("database is back")
    assert not health.degraded
