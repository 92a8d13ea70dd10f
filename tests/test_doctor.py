"""``fluxserve doctor``: one ``OK|WARN|FAIL  <what>  <detail>`` line per check and exit status 1 on
any FAIL, against real things: a SQLite file, a PostgreSQL port nobody listens on (and a real
server when Debian's PostgreSQL is installed), moto's S3 with and without the bucket, this
machine's torch (a CPU build: no GPU), the settings and the fetch policy."""

from __future__ import annotations

import json
import os
import re
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from fluxserve import doctor
from fluxserve.cli import app
from fluxserve.config import Settings
from fluxserve.jobs.database import open_database
from tests.support.s3 import DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY, create_bucket, running_s3
from tests.support.servers import free_port

LINE = re.compile(r"^(OK|WARN|FAIL) +(\S+(?: \S+)*)  +(\S.*)$")  # level, what (may hold one space), detail


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("FLUXSERVE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def run_doctor(tmp_path, *args: str, **env: str):
    result = CliRunner().invoke(app, ["doctor", "--data-dir", str(tmp_path / "data"), *args], env=env)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    checks = []
    for line in lines:
        match = LINE.match(line)
        assert match, f"not a check line: {line!r}"
        checks.append((match.group(1), match.group(2).strip(), match.group(3)))
    return result, checks


def only(checks, what: str) -> tuple[str, str]:
    found = [(level, detail) for level, name, detail in checks if name == what]
    assert len(found) == 1, (what, checks)
    return found[0]


def test_sqlite_tiny_models_on_this_cpu_machine(tmp_path):
    open_database(Settings(data_dir=tmp_path / "data").resolved_database_url)  # a database that exists
    result, checks = run_doctor(tmp_path, "--models", "tiny")
    assert result.exit_code == 0, result.output
    levels = {name: level for level, name, _ in checks}
    for name in ("python", "torch", "settings", "memory", "weights", "database", "object storage", "fetch policy"):
        assert levels[name] == "OK", (name, checks)
    assert all(level == "OK" for level, name, _ in checks if name == "disk")
    level, detail = only(checks, "database")
    assert detail.startswith(f"sqlite:///{(tmp_path / 'data' / 'fluxserve.db').resolve()}: SELECT 1 answered (sqlite")
    level, detail = only(checks, "gpu")  # the test machine's torch is a CPU build
    assert level == "WARN" and "the service runs on CPU" in detail and "FLUXSERVE_DEVICE" in detail
    assert "FLUXSERVE_S3_DEFAULT unset" in only(checks, "object storage")[1]
    assert "public addresses only" in only(checks, "fetch policy")[1]


def test_an_unreachable_postgresql_fails_with_the_fix_and_hides_the_password(tmp_path):
    url = f"postgresql://fluxserve:s3cret-pw@127.0.0.1:{free_port()}/fluxserve"
    result, checks = run_doctor(tmp_path, "--models", "tiny", "--database-url", url)
    assert result.exit_code == 1
    level, detail = only(checks, "database")
    assert level == "FAIL" and "SELECT 1 failed" in detail
    assert "start the database or fix FLUXSERVE_DATABASE_URL" in detail
    assert "s3cret-pw" not in result.stdout and "fluxserve:***@127.0.0.1" in detail
    assert only(checks, "python")[0] == "OK"  # the other checks still ran


def test_a_running_postgresql_answers(tmp_path, postgres_server):
    result, checks = run_doctor(tmp_path, "--models", "tiny", "--database-url", postgres_server)
    level, detail = only(checks, "database")
    assert level == "OK" and "SELECT 1 answered (postgresql" in detail, detail
    assert result.exit_code == 0, result.output


def s3_default(endpoint: str, bucket: str) -> str:
    return json.dumps({"bucket": bucket, "endpoint_url": endpoint, "public_url": f"{endpoint}/{bucket}",
                       "region_name": "us-east-1", "aws_access_key_id": DUMMY_ACCESS_KEY,
                       "aws_secret_access_key": DUMMY_SECRET_KEY})


def test_object_storage_head_bucket_ok_and_missing_bucket_fails(tmp_path):
    with running_s3() as endpoint:
        create_bucket(endpoint, "doctor-bucket")
        result, checks = run_doctor(tmp_path, "--models", "tiny", FLUXSERVE_S3_DEFAULT=s3_default(endpoint, "doctor-bucket"))
        assert result.exit_code == 0, result.output
        level, detail = only(checks, "object storage")
        assert level == "OK" and detail == f"bucket 'doctor-bucket' at {endpoint} answers HEAD"

        result, checks = run_doctor(tmp_path, "--models", "tiny", FLUXSERVE_S3_DEFAULT=s3_default(endpoint, "no-such-bucket"))
        assert result.exit_code == 1
        level, detail = only(checks, "object storage")
        assert level == "FAIL" and "bucket 'no-such-bucket' does not exist" in detail and "FLUXSERVE_S3_DEFAULT" in detail
        assert DUMMY_SECRET_KEY not in result.stdout and DUMMY_ACCESS_KEY not in result.stdout


def test_a_refused_setting_is_a_fail_line_and_the_machine_checks_still_run(tmp_path):
    result, checks = run_doctor(tmp_path, FLUXSERVE_DEVICE="gpu", FLUXSERVE_PORT="eighty")
    assert result.exit_code == 1
    problems = sorted(detail for level, name, detail in checks if name == "settings")
    assert all(level == "FAIL" for level, name, _ in checks if name == "settings")
    assert problems == ["FLUXSERVE_DEVICE: unknown device 'gpu'; use auto, cpu, cuda, cuda:N (e.g. cuda:1) or mps",
                        "FLUXSERVE_PORT: Input should be a valid integer, unable to parse string as an integer"]
    assert {name for _, name, _ in checks} >= {"python", "torch", "gpu"}


def test_asking_for_cuda_without_one_fails(tmp_path):
    result, checks = run_doctor(tmp_path, "--models", "tiny", FLUXSERVE_DEVICE="cuda")
    assert result.exit_code == 1
    level, detail = only(checks, "gpu")
    assert level == "FAIL" and "FLUXSERVE_DEVICE=cuda but" in detail and "FLUXSERVE_DEVICE=cpu" in detail
    cpu = run_doctor(tmp_path, "--models", "tiny", FLUXSERVE_DEVICE="cpu")[1]
    assert only(cpu, "gpu") == ("OK", "FLUXSERVE_DEVICE=cpu: the service runs on CPU")


def test_the_fetch_policy_says_what_it_allows(tmp_path):
    checks = run_doctor(tmp_path, "--models", "tiny", FLUXSERVE_FETCH_ALLOW='["minio.internal", "10.0.0.0/8"]')[1]
    level, detail = only(checks, "fetch policy")
    assert level == "OK" and "hosts minio.internal" in detail and "networks 10.0.0.0/8" in detail
    result, checks = run_doctor(tmp_path, "--models", "tiny", FLUXSERVE_FETCH_ALLOW='["0.0.0.0/0"]')
    level, detail = only(checks, "fetch policy")
    assert level == "WARN" and "allows every address" in detail
    assert result.exit_code == 0  # a warning is not a failure


def test_real_models_not_cached_say_how_to_pull_them(tmp_path):
    checks = run_doctor(tmp_path)[1]
    weights = {detail.split(":")[0]: (level, detail) for level, name, detail in checks if name == "weights"}
    assert set(weights) == {"flux", "flux-fill", "flux-klein, realtime", "flux-kontext-dev"}
    level, detail = weights["flux-klein, realtime"]
    assert level == "WARN" and "fluxserve models pull flux-klein" in detail and "HF_TOKEN" not in detail
    assert "gated: set HF_TOKEN" in weights["flux"][1]


# -- memory against a GPU (a stand-in for torch.cuda: this machine has none) -----------------------
def fake_torch(total_gib: float):
    props = SimpleNamespace(total_memory=int(total_gib * doctor.GIB), name="Fake GPU", major=9, minor=0)
    cuda = SimpleNamespace(is_available=lambda: True, device_count=lambda: 1, get_device_properties=lambda index: props)
    return SimpleNamespace(cuda=cuda, version=SimpleNamespace(cuda="12.8"))


@pytest.mark.parametrize(("gib", "offload", "ram_gib", "level", "words"), [
    (141, "none", 64, "OK", "GPU budget 126.9 GiB of 141.0 GiB"),
    (24, "none", 64, "WARN", "set FLUXSERVE_OFFLOAD=model"),
    (24, "model", 64, "OK", "FLUXSERVE_OFFLOAD=model streams the larger ones"),
    (24, "model", 16, "FAIL", "the weights live in RAM, which is too small"),
])
def test_memory_compares_the_largest_model_with_the_gpu_budget(tmp_path, monkeypatch, gib, offload, ram_gib, level, words):
    monkeypatch.setattr(doctor, "_ram_bytes", lambda: ram_gib * doctor.GIB)
    settings = Settings(data_dir=tmp_path, offload=offload)
    check = doctor.check_memory(fake_torch(gib), settings)
    assert check.level == level and words in check.detail, check
    assert "~34.0 GiB (black-forest-labs/FLUX.1-dev)" in check.detail
