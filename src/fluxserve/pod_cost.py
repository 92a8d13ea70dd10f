"""Busy workers are the last to go on a Kubernetes scale-in: the worker role annotates its own pod
with ``controller.kubernetes.io/pod-deletion-cost``, and a ReplicaSet scaling down deletes the pods
with the lowest cost first (Kubernetes >= 1.22, on by default).

The cost is the number of jobs the pod's workers have in hand (a batch counts each of its jobs;
idle: 0). It is the work a deletion would interrupt: those jobs go back to the queue and start over
elsewhere (or wait out the grace period first). Only the order between the pods of one ReplicaSet
matters, so an idle pod (0) goes before any busy one, and of two busy pods the one with less work in
hand goes first. The annotation is only a hint: Kubernetes may still pick a busy pod, which then
drains as on any SIGTERM.

A small client of the Kubernetes API, on httpx alone: in-cluster configuration from the standard
service-account files (``/var/run/secrets/kubernetes.io/serviceaccount/{token,ca.crt,namespace}``)
and ``KUBERNETES_SERVICE_HOST``/``KUBERNETES_SERVICE_PORT``; the pod's own name from the downward
API (``FLUXSERVE_POD_NAME``), its namespace from ``FLUXSERVE_POD_NAMESPACE`` or the namespace file.
It PATCHes its own pod (JSON merge patch), which needs a Role allowing ``patch`` on ``pods``
(deploy/kubernetes/base/worker-rbac.yaml).

A background thread looks at the cost every second and patches only when it changed (and once at
start, since a restarted container may find its last value still there). It never blocks job work:
the cost is read from the pool's in-memory state. A failure (no RBAC, API server away) is logged
once as a warning, retried with a growing pause (up to a minute), and logged again as resumed when a
patch succeeds; it never stops the worker."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from fluxserve.config import Settings

log = logging.getLogger(__name__)

ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
SERVICEACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MAX_COST = 2**31 - 1  # the annotation is an int32
CHECK_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 60.0
REQUEST_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class PodTarget:
    """Where to patch and with what: the API server, the pod, the bearer token file and the CA
    bundle (None: an http:// API, for tests)."""

    api_url: str
    namespace: str
    pod_name: str
    token_path: Path
    ca_path: Path | None

    @property
    def pod_path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}"


def pod_target(settings: Settings, environ: Mapping[str, str] = os.environ) -> PodTarget | None:
    """The pod to annotate, or None when the feature is off: ``FLUXSERVE_POD_DELETION_COST=off``,
    or ``auto`` without a pod name or without an API server (outside Kubernetes)."""
    if settings.pod_deletion_cost == "off" or not settings.pod_name:
        return None
    api_url = settings.kubernetes_api_url
    if not api_url:
        host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            return None
        api_url = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    account = settings.kubernetes_serviceaccount_dir
    namespace = settings.pod_namespace
    if not namespace:
        try:
            namespace = (account / "namespace").read_text().strip()
        except OSError as exc:
            log.warning("pod deletion cost off: FLUXSERVE_POD_NAMESPACE unset and %s", exc)
            return None
    ca_path = account / "ca.crt" if api_url.lower().startswith("https://") else None
    return PodTarget(api_url.rstrip("/"), namespace, settings.pod_name, account / "token", ca_path)


class PodCostClient:
    """PATCHes the pod's deletion-cost annotation. The token is read on every request: the
    kubelet rotates projected service-account tokens (about hourly) in place."""

    def __init__(self, target: PodTarget, timeout: float = REQUEST_TIMEOUT_SECONDS):
        self.target = target
        verify: str | bool = str(target.ca_path) if target.ca_path is not None else True
        self._http = httpx.Client(base_url=target.api_url, timeout=timeout, verify=verify)

    def patch(self, cost: int) -> None:
        """Sets the annotation to ``cost``; raises ``httpx.HTTPError`` (a refusal: HTTPStatusError)
        or ``OSError`` (no token file)."""
        token = self.target.token_path.read_text().strip()
        body = {"metadata": {"annotations": {ANNOTATION: str(cost)}}}
        answer = self._http.patch(self.target.pod_path, json=body, headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/merge-patch+json",
            "Accept": "application/json"})
        answer.raise_for_status()

    def close(self) -> None:
        self._http.close()


class PodDeletionCost:
    """Keeps the annotation equal to ``cost()`` from a daemon thread (``start``/``stop``);
    ``check`` is one round of it, for tests."""

    def __init__(self, client: PodCostClient, cost: Callable[[], int], interval: float = CHECK_SECONDS,
                 max_backoff: float = MAX_BACKOFF_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.client = client
        self.cost = cost
        self.interval = interval
        self.max_backoff = max_backoff
        self.clock = clock
        self.sent: int | None = None  # the value the pod has, as far as we know (None: not set by us yet)
        self.failures = 0
        self._retry_at = 0.0
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> None:
        """Patches when the cost differs from what was last set and no backoff is running."""
        value = max(0, min(MAX_COST, int(self.cost())))
        if value == self.sent or self.clock() < self._retry_at:
            return
        try:
            self.client.patch(value)
        except (httpx.HTTPError, OSError) as exc:
            self.failures += 1
            pause = min(self.max_backoff, self.interval * 2 ** min(self.failures, 16))
            self._retry_at = self.clock() + pause
            if self.failures == 1:
                log.warning("could not set %s on pod %s/%s (retrying, up to every %.0f s): %s", ANNOTATION,
                            self.client.target.namespace, self.client.target.pod_name, self.max_backoff, _describe(exc))
            return
        if self.failures:
            log.warning("set %s on pod %s/%s again, after %d failed tries", ANNOTATION,
                        self.client.target.namespace, self.client.target.pod_name, self.failures)
        self.sent, self.failures, self._retry_at = value, 0, 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fluxserve-pod-cost", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=REQUEST_TIMEOUT_SECONDS + 1)
        self.client.close()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a bug here must not end the updates quietly, nor the worker
                log.exception("pod deletion cost check failed")
            self._stopped.wait(self.interval)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        answer = exc.response
        return f"HTTP {answer.status_code} from {exc.request.method} {exc.request.url.path}: {answer.text[:300]}"
    return f"{type(exc).__name__}: {exc}"


def start_pod_cost(settings: Settings, cost: Callable[[], int]) -> PodDeletionCost | None:
    """The started updater for this pod, or None when off (see ``pod_target``)."""
    target = pod_target(settings)
    if target is None:
        return None
    log.info("keeping %s on pod %s/%s up to date (%s)", ANNOTATION, target.namespace, target.pod_name, target.api_url)
    updater = PodDeletionCost(PodCostClient(target), cost)
    updater.start()
    return updater
