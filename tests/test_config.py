"""The settings check every free-text value when they are built: a refused one is a
ValidationError whose message (settings_problems) names the variable, and nothing in them
imports torch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from fluxserve.config import Settings, settings_problems

S3 = ('{"public_url": "https://images.example.com/out", "endpoint_url": "https://storage.example.com", '
      '"aws_access_key_id": "AKIDEXAMPLE", "aws_secret_access_key": "s3cr3t-value", "image_directory": "bucket/dir"}')


@pytest.fixture(autouse=True)
def _no_fluxserve_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("FLUXSERVE_"):
            monkeypatch.delenv(name)


def problems(monkeypatch, variable: str, value: str) -> list[str]:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    return settings_problems(caught.value)


REFUSED = [
    ("FLUXSERVE_OPTIMIZATIONS", "compil", "unknown optimization 'compil'; known: all, attention"),
    ("FLUXSERVE_OPTIMIZATIONS", "compile=maybe", "compile: expected on/off"),
    ("FLUXSERVE_OPTIMIZATIONS", "prompt_cache=-1", "prompt_cache_size must be >= 0"),
    ("FLUXSERVE_OPTIMIZATIONS", "attention=no such kernel", "is not a backend name"),
    ("FLUXSERVE_DEVICE", "gpu", "unknown device 'gpu'; use auto, cpu, cuda, cuda:N"),
    ("FLUXSERVE_DEVICE", "cuda:one", "unknown device"),
    ("FLUXSERVE_GPU_MEMORY_BUDGET", "lots", "not a size: 'lots'"),
    ("FLUXSERVE_GPU_MEMORY_BUDGET", "20 GiBs", "not a size"),
    ("FLUXSERVE_MODEL_OVERRIDES", '{"flux": {"stpes": 4}}', "unknown fields ['stpes']; overridable: guidance"),
    ("FLUXSERVE_MODEL_OVERRIDES", '{"sdxl": {"steps": 4}}', "unknown model 'sdxl'; known: flux, flux-fill, flux-klein"),
    ("FLUXSERVE_MODEL_OVERRIDES", '{"flux": {"steps": "four"}}', "['flux'].steps must be a whole number"),
    ("FLUXSERVE_MODEL_OVERRIDES", '{"flux": {"source": "/m",}}', "not valid JSON"),
    ("FLUXSERVE_MODEL_OVERRIDES", '["flux"]', "valid dictionary"),
    ("FLUXSERVE_S3_DEFAULT", '{"bucket": "b"}', "missing fields ['aws_access_key_id', 'aws_secret_access_key', 'public_url']"),
    ("FLUXSERVE_S3_DEFAULT", S3[:-1] + ', "bukcet": "x"}', "unknown fields ['bukcet']; accepted: public_url"),
    ("FLUXSERVE_S3_DEFAULT", S3.replace('"https://images.example.com/out"', '"images.example.com"'),
     "public_url must be a http(s) URL"),
    ("FLUXSERVE_S3_DEFAULT", S3.replace('"bucket/dir"', '""'), "bucket could not be determined"),
    ("FLUXSERVE_FETCH_ALLOW", '["10.1.2.1/24"]', "allow entry '10.1.2.1/24' is not a valid CIDR"),
    ("FLUXSERVE_FETCH_ALLOW", '["minio internal"]', "expected a host name"),
    ("FLUXSERVE_FETCH_ALLOW", "10.0.0.0/8", "not valid JSON"),
    ("FLUXSERVE_CORS_ORIGINS", '["https://app.example.com/"]', "must not have a path"),
    ("FLUXSERVE_CORS_ORIGINS", '["app.example.com"]', "expected an origin"),
    ("FLUXSERVE_RATE_LIMIT_PER_KEY", "lots", "not a rate limit: 'lots'"),
    ("FLUXSERVE_RATE_LIMIT_PER_ADDRESS", "5/fortnight", "not a rate limit"),
    ("FLUXSERVE_COMPILE_WARM_SIZES", "[512, 1001]", "warm size 1001 must be a multiple of 8"),
    ("FLUXSERVE_COMPILE_WARM_SIZES", "[4096]", "from 8 to 2048"),
    ("FLUXSERVE_COMPILE_WARM_SIZES", '["big"]', "[0]: Input should be a valid integer"),
    ("FLUXSERVE_PUBLIC_BASE_URL", "images.example.com", "expected a http(s) URL"),
    ("FLUXSERVE_PUBLIC_BASE_URL", "https://user:pw@images.example.com", "must not have credentials"),
    ("FLUXSERVE_PORT", "eighty", "Input should be a valid integer"),
]


@pytest.mark.parametrize(("variable", "value", "message"), REFUSED)
def test_a_refused_setting_is_named_with_its_problem(monkeypatch, variable, value, message):
    lines = problems(monkeypatch, variable, value)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{variable}: ") and message in lines[0], lines


def test_every_problem_has_its_line_and_no_value_is_repeated(monkeypatch):
    monkeypatch.setenv("FLUXSERVE_OPTIMIZATIONS", "compil")
    monkeypatch.setenv("FLUXSERVE_DEVICE", "gpu")
    monkeypatch.setenv("FLUXSERVE_S3_DEFAULT", S3.replace('"bucket/dir"', '""'))
    with pytest.raises(ValidationError) as caught:
        Settings()
    lines = settings_problems(caught.value, flags=["device"])
    assert [line.split(":")[0] for line in lines] == [
        "FLUXSERVE_DEVICE (--device)", "FLUXSERVE_OPTIMIZATIONS", "FLUXSERVE_S3_DEFAULT"]
    assert not any("s3cr3t" in line or "AKIDEXAMPLE" in line for line in lines)


ACCEPTED = [
    ("FLUXSERVE_OPTIMIZATIONS", "compile,fp8,attention=_native_cudnn", "compile,fp8,attention=_native_cudnn"),
    ("FLUXSERVE_OPTIMIZATIONS", "none", "none"),
    ("FLUXSERVE_OPTIMIZATIONS", "", ""),
    ("FLUXSERVE_OPTIMIZATIONS", "default", "default"),
    ("FLUXSERVE_OPTIMIZATIONS", "all,-fp8,prompt_cache=64,compile_dynamic=auto", "all,-fp8,prompt_cache=64,compile_dynamic=auto"),
    ("FLUXSERVE_OPTIMIZATIONS", "attention=flsh", "attention=flsh"),  # a well-formed name: the engine reports it
    ("FLUXSERVE_DEVICE", "cuda:1", "cuda:1"),
    ("FLUXSERVE_DEVICE", " CUDA ", "cuda"),
    ("FLUXSERVE_DEVICE", "mps", "mps"),
    ("FLUXSERVE_GPU_MEMORY_BUDGET", "20GiB", "20GiB"),
    ("FLUXSERVE_GPU_MEMORY_BUDGET", "512MB", "512MB"),
    ("FLUXSERVE_GPU_MEMORY_BUDGET", "123456", "123456"),
    ("FLUXSERVE_MODEL_OVERRIDES", '{"flux": {"source": "/models/FLUX.1-schnell", "steps": 4}}',
     {"flux": {"source": "/models/FLUX.1-schnell", "steps": 4}}),
    ("FLUXSERVE_MODEL_OVERRIDES", "", {}),
    ("FLUXSERVE_FETCH_ALLOW", '["10.1.2.0/24", "minio.internal"]', ["10.1.2.0/24", "minio.internal"]),
    ("FLUXSERVE_FETCH_ALLOW", '["192.168.1.7", "::1/128"]', ["192.168.1.7", "::1/128"]),
    ("FLUXSERVE_CORS_ORIGINS", '["https://app.example.com", "http://localhost:3000"]',
     ["https://app.example.com", "http://localhost:3000"]),
    ("FLUXSERVE_CORS_ORIGINS", '["*"]', ["*"]),
    ("FLUXSERVE_RATE_LIMIT_PER_KEY", "", ""),
    ("FLUXSERVE_RATE_LIMIT_PER_ADDRESS", "10/second", "10/second"),
    ("FLUXSERVE_COMPILE_WARM_SIZES", "[256, 512, 1024]", [256, 512, 1024]),
    ("FLUXSERVE_COMPILE_WARM_SIZES", "[]", []),
    ("FLUXSERVE_PUBLIC_BASE_URL", "https://images.example.com/fluxserve/", "https://images.example.com/fluxserve"),
    ("FLUXSERVE_S3_DEFAULT", "", None),
]


@pytest.mark.parametrize(("variable", "value", "expected"), ACCEPTED)
def test_valid_spellings_are_accepted(monkeypatch, variable, value, expected):
    monkeypatch.setenv(variable, value)
    assert getattr(Settings(), variable.removeprefix("FLUXSERVE_").lower()) == expected


def test_the_server_default_bucket_is_checked_without_connecting(monkeypatch):
    monkeypatch.setenv("FLUXSERVE_S3_DEFAULT", S3)
    details = Settings().s3_default_details()  # storage.example.com does not exist: nothing is contacted
    assert (details.bucket, details.prefix, details.endpoint_url) == ("bucket", "dir", "https://storage.example.com")
    assert Settings().model_copy(update={"s3_default": None}).s3_default_details() is None


def test_flags_and_init_values_are_checked_too():
    with pytest.raises(ValidationError) as caught:
        Settings(optimizations="compil", compile_warm_sizes=[12])
    assert [line.split(":")[0] for line in settings_problems(caught.value)] == [
        "FLUXSERVE_OPTIMIZATIONS", "FLUXSERVE_COMPILE_WARM_SIZES"]
    assert Settings(fetch_allow=["10.0.0.0/8"], model_overrides={"flux": {"steps": 4}}).fetch_allow == ["10.0.0.0/8"]


def test_settings_round_trip_through_the_worker_process():
    """The process worker rebuilds its settings from model_dump(mode="json"): they must pass again."""
    settings = Settings(optimizations="none", device="cpu", cors_origins=["*"], compile_warm_sizes=[256],
                        model_overrides={"flux": {"steps": 4}}, public_base_url="https://x.example/")
    assert Settings(**settings.model_dump(mode="json")) == settings


def test_checking_the_settings_imports_no_torch():
    code = ("import os, sys; os.environ.update(FLUXSERVE_OPTIMIZATIONS='compile,fp8', FLUXSERVE_GPU_MEMORY_BUDGET='20GiB', "
            "FLUXSERVE_MODEL_OVERRIDES='{\"flux\": {\"steps\": 4}}', FLUXSERVE_FETCH_ALLOW='[\"10.0.0.0/8\"]', "
            "FLUXSERVE_RATE_LIMIT_PER_KEY='1/second', FLUXSERVE_CORS_ORIGINS='[\"*\"]'); "
            "from fluxserve.config import Settings; Settings(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
