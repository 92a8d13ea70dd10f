"""Limits that hold across API replicas: the rate limits with their counters in Redis
(``FLUXSERVE_REDIS_URL``, a real redis-server on loopback), and the per-key queue limit, which
counts the shared database's rows."""

from __future__ import annotations

import uuid

import pytest

from fluxserve.keys import KeyStore
from tests.support.postgres import create_database
from tests.support.redis import RedisUnavailable, redis_required, running_redis
from tests.support.replicas import api_replica

FETCH = "/api/v1/enterprise/flux/fetch/1"  # needs a key (counted), answers 404: no job 1
KLEIN = "/api/v1/enterprise/flux_klein/text2img"


@pytest.fixture
def redis(tmp_path):
    try:
        with running_redis(tmp_path) as server:
            yield server
    except RedisUnavailable as exc:
        if redis_required():
            pytest.fail(f"FLUXSERVE_REQUIRE_REDIS=1 but {exc}")
        pytest.skip(str(exc))


def two_replicas(tmp_path, tiny_root, **settings):
    database = dict(database_url=f"sqlite:///{tmp_path / 'shared.db'}")
    return (api_replica(tmp_path / "a", tiny_root, **database, **settings),
            api_replica(tmp_path / "b", tiny_root, **database, **settings))


def codes(replica, key: str, count: int) -> list[int]:
    with replica.client() as client:
        return [client.post(FETCH, json={"key": key}).status_code for _ in range(count)]


def test_rate_limits_hold_across_replicas_with_redis(tmp_path, tiny_root, redis):
    first, second = two_replicas(tmp_path, tiny_root, redis_url=redis.url,
                                 rate_limit_per_key="3/minute", rate_limit_per_address="7/minute")
    with first as a, second as b:
        keys = KeyStore(a.jobs._sessions)
        key, other = keys.create("user")[1], keys.create("other")[1]
        assert codes(a, key, 2) + codes(b, key, 1) == [404, 404, 404]
        with b.client() as client:
            refused = client.post(FETCH, json={"key": key})  # the key's 4th request (B's 2nd)
        assert refused.status_code == 429
        assert refused.json()["message"] == "Rate limit exceeded: at most 3 per 1 minute per key."
        assert codes(a, key, 1) == [429]  # A counts B's requests too
        assert codes(a, other, 1) == [404]  # another key has its own count: the address's 6th request
        assert codes(b, other, 1) == [404]  # the address's 7th
        with a.client() as client:
            by_address = client.post(FETCH, json={"key": other})  # the 8th from 127.0.0.1, across both
        assert by_address.status_code == 429
        assert by_address.json()["message"] == "Rate limit exceeded: at most 7 per 1 minute per client address."


def test_without_redis_each_replica_counts_alone(tmp_path, tiny_root):
    first, second = two_replicas(tmp_path, tiny_root, rate_limit_per_key="3/minute", rate_limit_per_address="")
    with first as a, second as b:
        key = KeyStore(a.jobs._sessions).create("user")[1]
        assert codes(a, key, 4) == [404, 404, 404, 429]
        assert codes(b, key, 3) == [404, 404, 404]  # in memory: B never saw A's requests


def test_an_unreachable_redis_lets_requests_through(tmp_path, tiny_root, redis):
    with api_replica(tmp_path / "a", tiny_root, database_url=f"sqlite:///{tmp_path / 'a.db'}", redis_url=redis.url,
                     rate_limit_per_key="2/minute", rate_limit_per_address="") as a:
        key = KeyStore(a.jobs._sessions).create("user")[1]
        assert codes(a, key, 3) == [404, 404, 429]
        redis.process.terminate()
        redis.process.wait(10)
        assert codes(a, key, 3) == [404, 404, 404]  # the limiter's store is away: not an outage of the API


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_queue_limit_per_key_holds_across_replicas(tmp_path, tiny_root, backend, request):
    if backend == "postgresql":
        url = create_database(request.getfixturevalue("postgres_server"), f"queue_limit_{uuid.uuid4().hex[:8]}")
    else:
        url = f"sqlite:///{tmp_path / 'shared.db'}"
    settings = dict(database_url=url, max_queued_per_key=2)
    with api_replica(tmp_path / "a", tiny_root, **settings) as a, api_replica(tmp_path / "b", tiny_root, **settings) as b:
        key = KeyStore(a.jobs._sessions).create("user")[1]
        body = {"key": key, "prompt": "a", "width": 256, "height": 256, "num_inference_steps": 1,
                "instant_response": True}
        with a.client() as client_a, b.client() as client_b:
            assert client_a.post(KLEIN, json=body).json()["status"] == "processing"
            assert client_b.post(KLEIN, json=body).json()["status"] == "processing"
            for client in (client_a, client_b):  # no replica (and no worker) has taken one off the queue
                refused = client.post(KLEIN, json=body)
                assert refused.status_code == 429
                assert refused.json()["message"] == "Rate limit exceeded. Maximum 2 queued requests allowed."


@pytest.mark.parametrize("url, problem", [
    ("http://127.0.0.1:6379", "not a Redis URL: http scheme"),
    ("127.0.0.1:6379", "not a Redis URL"),
])
def test_redis_url_is_checked_with_the_settings(url, problem):
    from pydantic import ValidationError

    from fluxserve.config import Settings, settings_problems

    with pytest.raises(ValidationError) as caught:
        Settings(redis_url=url)
    assert any(line.startswith("FLUXSERVE_REDIS_URL: ") and problem in line for line in settings_problems(caught.value))
    assert Settings(redis_url="").redis_url is None
    assert Settings(redis_url=" rediss://cache.internal:6380/1 ").redis_url == "rediss://cache.internal:6380/1"
