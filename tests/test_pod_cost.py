"""The pod deletion cost (``fluxserve.pod_cost``) against a fake Kubernetes API server on loopback
(plain HTTP) that records every request: the right pod's path, a JSON merge patch, the bearer token
from the token file; a patch only when the value changes; a refusal logged once, never raised, and
the updates resumed when the API accepts them again; off outside Kubernetes. And the real worker
role, pointed at the fake API: its pod's cost rises while it runs a long job and falls back to 0."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from fluxserve.config import Settings
from fluxserve.pod_cost import ANNOTATION, PodCostClient, PodDeletionCost, PodTarget, pod_target
from tests.support.process_server import ServerProcess, WorkerProcess
from tests.support.waiting import wait_for_job, wait_until
from tests.test_roles import KLEIN, LONG

TOKEN = "sa-token-1"


class FakeKubernetes:
    """Records each request as a dict (method, path, content_type, authorization, body) and answers
    ``status`` (200 with the pod, else a Status object, as the API server does)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.status = 200
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_PATCH(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with fake.lock:
                    fake.requests.append({"method": "PATCH", "path": self.path,
                                          "content_type": self.headers.get("Content-Type"),
                                          "authorization": self.headers.get("Authorization"),
                                          "body": json.loads(body)})
                    status = fake.status
                answer = (json.loads(body) if status == 200 else
                          {"kind": "Status", "status": "Failure", "reason": "Forbidden", "code": status,
                           "message": 'pods "worker-0" is forbidden: User cannot patch resource "pods"'})
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def costs(self) -> list[int]:
        with self.lock:
            return [int(r["body"]["metadata"]["annotations"][ANNOTATION]) for r in self.requests]


@pytest.fixture
def kubernetes() -> Iterator[FakeKubernetes]:
    fake = FakeKubernetes()
    fake.thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()


@pytest.fixture
def account(tmp_path) -> Path:
    """A service-account folder as Kubernetes mounts it (no ca.crt needed over http)."""
    folder = tmp_path / "serviceaccount"
    folder.mkdir()
    (folder / "token").write_text(TOKEN + "\n")
    (folder / "namespace").write_text("images\n")
    return folder


def settings_for(kubernetes: FakeKubernetes, account: Path, **extra) -> Settings:
    return Settings(pod_name="worker-flux-7d9c-abcde", kubernetes_api_url=kubernetes.url,
                    kubernetes_serviceaccount_dir=account, **extra)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def updater(kubernetes: FakeKubernetes, account: Path, cost, clock: Clock | None = None) -> PodDeletionCost:
    target = pod_target(settings_for(kubernetes, account), environ={})
    assert target is not None
    return PodDeletionCost(PodCostClient(target), cost, interval=1.0, max_backoff=8.0, clock=clock or Clock())


def test_it_patches_its_own_pod_with_the_bearer_token_as_a_merge_patch(kubernetes, account):
    cost = updater(kubernetes, account, lambda: 2)
    cost.check()
    (request,) = kubernetes.requests
    assert request["method"] == "PATCH"
    assert request["path"] == "/api/v1/namespaces/images/pods/worker-flux-7d9c-abcde"  # namespace from the file
    assert request["content_type"] == "application/merge-patch+json"
    assert request["authorization"] == f"Bearer {TOKEN}"
    assert request["body"] == {"metadata": {"annotations": {ANNOTATION: "2"}}}  # a string, as annotations are


def test_only_changes_are_patched_and_busy_idle_busy_gives_each_value(kubernetes, account):
    jobs = [0]
    cost = updater(kubernetes, account, lambda: jobs[0])
    for value in (0, 0, 1, 1, 1, 0, 0, 4, 4, 0):  # idle (set once at start), busy, idle, a batch of 4, idle
        jobs[0] = value
        cost.check()
    assert kubernetes.costs() == [0, 1, 0, 4, 0]


def test_the_token_is_read_again_for_each_patch(kubernetes, account):
    """Projected service-account tokens are rotated in place by the kubelet."""
    jobs = [0]
    cost = updater(kubernetes, account, lambda: jobs[0])
    cost.check()
    (account / "token").write_text("sa-token-2")
    jobs[0] = 1
    cost.check()
    assert [r["authorization"] for r in kubernetes.requests] == [f"Bearer {TOKEN}", "Bearer sa-token-2"]


def test_a_refusal_is_logged_once_never_raised_and_retried_with_backoff_until_it_works(kubernetes, account, caplog):
    clock, jobs = Clock(), [1]
    cost = updater(kubernetes, account, lambda: jobs[0], clock)
    kubernetes.status = 403  # no RBAC yet
    with caplog.at_level(logging.WARNING, logger="fluxserve.pod_cost"):
        cost.check()
        assert len(kubernetes.requests) == 1
        cost.check()  # within the backoff: not asked again
        assert len(kubernetes.requests) == 1
        for _ in range(3):
            clock.now += 100
            cost.check()
        assert len(kubernetes.requests) == 4
        refusals = [r for r in caplog.records if "could not set" in r.getMessage()]
        assert len(refusals) == 1, [r.getMessage() for r in caplog.records]
        assert "HTTP 403" in refusals[0].getMessage() and "forbidden" in refusals[0].getMessage()

        kubernetes.status = 200  # the Role is applied
        clock.now += 100
        cost.check()
        assert kubernetes.costs()[-1] == 1 and cost.sent == 1 and cost.failures == 0
        assert any("again, after 4 failed tries" in r.getMessage() for r in caplog.records)
        jobs[0] = 0
        cost.check()  # no backoff left over
    assert kubernetes.costs()[-2:] == [1, 0]


def test_backoff_grows_and_is_capped(kubernetes, account):
    clock = Clock()
    cost = updater(kubernetes, account, lambda: 1, clock)
    kubernetes.status = 403
    pauses = []
    for _ in range(6):
        before = len(kubernetes.requests)
        cost.check()
        assert len(kubernetes.requests) == before + 1
        pauses.append(cost._retry_at - clock.now)
        clock.now = cost._retry_at
    assert pauses == [2.0, 4.0, 8.0, 8.0, 8.0, 8.0]


def test_an_api_server_away_is_survived(account):
    """Nothing listens there: a connection error, logged, not raised."""
    target = PodTarget("http://127.0.0.1:9", "images", "worker-0", account / "token", None)
    cost = PodDeletionCost(PodCostClient(target, timeout=2), lambda: 1, clock=Clock())
    cost.check()
    assert cost.failures == 1 and cost.sent is None


def test_the_thread_follows_the_cost(kubernetes, account):
    jobs = [0]
    target = pod_target(settings_for(kubernetes, account), environ={})
    assert target is not None
    cost = PodDeletionCost(PodCostClient(target), lambda: jobs[0], interval=0.05)
    cost.start()
    try:
        wait_until(lambda: kubernetes.costs() == [0], timeout=10)
        jobs[0] = 3
        wait_until(lambda: kubernetes.costs() == [0, 3], timeout=10)
        jobs[0] = 0
        wait_until(lambda: kubernetes.costs() == [0, 3, 0], timeout=10)
    finally:
        cost.stop()


# -- when it is on ------------------------------------------------------------------------------


def test_auto_is_off_without_a_pod_name_or_an_api_server(account, monkeypatch):
    for name in ("FLUXSERVE_POD_NAME", "FLUXSERVE_KUBERNETES_API_URL", "FLUXSERVE_POD_DELETION_COST"):
        monkeypatch.delenv(name, raising=False)
    in_cluster = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert pod_target(Settings(kubernetes_serviceaccount_dir=account), environ=in_cluster) is None  # no pod name
    named = Settings(pod_name="worker-0", kubernetes_serviceaccount_dir=account)
    assert pod_target(named, environ={}) is None  # not in a cluster
    target = pod_target(named, environ=in_cluster)
    assert target == PodTarget("https://10.96.0.1:443", "images", "worker-0", account / "token", account / "ca.crt")
    ipv6 = pod_target(named, environ={"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"})
    assert ipv6 is not None and ipv6.api_url == "https://[fd00::1]:6443"
    off = Settings(pod_name="worker-0", pod_deletion_cost="off", kubernetes_serviceaccount_dir=account)
    assert pod_target(off, environ=in_cluster) is None


def test_the_namespace_setting_wins_over_the_file_and_a_missing_file_turns_it_off(account, tmp_path):
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}
    chosen = pod_target(Settings(pod_name="w", pod_namespace="gpu", kubernetes_serviceaccount_dir=account), environ=env)
    assert chosen is not None and chosen.pod_path == "/api/v1/namespaces/gpu/pods/w"
    assert pod_target(Settings(pod_name="w", kubernetes_serviceaccount_dir=tmp_path / "none"), environ=env) is None


@pytest.mark.parametrize(("field", "value"), [
    ("pod_name", "Worker_0"), ("pod_name", "-worker"), ("pod_namespace", "a.b"), ("pod_namespace", "x" * 64),
    ("kubernetes_api_url", "10.96.0.1:443"), ("pod_deletion_cost", "on"),
])
def test_bad_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        Settings(**{field: value})


# -- the real worker role ---------------------------------------------------------------------------


def test_the_worker_roles_pod_cost_rises_while_it_generates_and_falls_back_after(
        tmp_path, tiny_root, database_url, kubernetes, account):
    data = tmp_path / "data"
    api = ServerProcess(data, tiny_root, FLUXSERVE_RUN_WORKER="false", FLUXSERVE_DATABASE_URL=database_url)
    worker = WorkerProcess(data, tiny_root, FLUXSERVE_DATABASE_URL=database_url, FLUXSERVE_PUBLIC_BASE_URL=api.base_url,
                           FLUXSERVE_SHUTDOWN_GRACE_SECONDS="1", FLUXSERVE_POD_NAME="worker-klein-5f6d-xyz12",
                           FLUXSERVE_POD_NAMESPACE="images", FLUXSERVE_KUBERNETES_API_URL=kubernetes.url,
                           FLUXSERVE_KUBERNETES_SERVICEACCOUNT_DIR=str(account))
    try:
        api.start()
        worker.start()
        wait_until(lambda: kubernetes.costs()[:1] == [0], timeout=30, what="the cost set at start")
        key = api.create_key("user")
        with httpx.Client(base_url=api.base_url, timeout=30) as client:
            answer = client.post(KLEIN, json={"key": key, **LONG, "instant_response": True}).json()
            assert answer["status"] == "processing", answer
            wait_until(lambda: 1 in kubernetes.costs(), timeout=60, what="the cost of a job in hand")
            assert worker.health().json()["busy"] == 1, "the patch came while the job ran"
            done = wait_for_job(client, key, answer["id"], timeout=300).json()
            assert done["status"] == "success", done
        wait_until(lambda: kubernetes.costs()[-1] == 0, timeout=30, what="the cost back to 0")
        assert kubernetes.costs() == [0, 1, 0]
        assert {r["path"] for r in kubernetes.requests} == {"/api/v1/namespaces/images/pods/worker-klein-5f6d-xyz12"}
        assert {r["authorization"] for r in kubernetes.requests} == {f"Bearer {TOKEN}"}
    finally:
        worker.stop()
        api.stop()
