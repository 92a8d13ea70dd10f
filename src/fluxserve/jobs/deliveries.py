"""Webhook deliveries as admins see them: the ones that gave up (``failed``: the receiver
refused; ``dead``: the retry window ended) listed newest first, and replayed.

A replay puts the same row back to ``pending`` with a fresh retry window and attempts
counter (its delivery id, hence its ``Idempotency-Key``, stays the same, so receivers that
dedupe still can); only a failed or dead row can be replayed, guarded by that state in the
UPDATE itself, so two admins replaying at once replay it once. The dispatcher's claim token is
cleared, so an attempt from before the replay can never record its outcome on the new life
of the row.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from fluxserve.jobs.database import rowcount
from fluxserve.jobs.status import DeliveryStatus
from fluxserve.jobs.tables import WebhookDelivery, utcnow

GIVEN_UP = (DeliveryStatus.FAILED.value, DeliveryStatus.DEAD.value)
MAX_RECEIVER_CHARS = 300  # WebhookDelivery.receiver
_DEFAULT_PORTS = {"http": 80, "https": 443}


def receiver_of(url: str) -> str:
    """``scheme://host[:port]`` of a webhook URL (lower case, default port left out): who the
    per-host limit counts POSTs for, and what admins are shown. Never the user info, path or
    query, which may carry the receiver's token. ``"?"`` for a URL that does not parse (such a
    delivery is refused by the URL check before any POST)."""
    try:
        parts = urlsplit(url.strip())
        host, port = (parts.hostname or "").lower(), parts.port
    except (ValueError, AttributeError):
        return "?"
    scheme = parts.scheme.lower()
    if not host or scheme not in _DEFAULT_PORTS:
        return "?"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    shown = f"{scheme}://{host}" + (f":{port}" if port is not None and port != _DEFAULT_PORTS[scheme] else "")
    return shown[:MAX_RECEIVER_CHARS]


class ReplayRefused(Exception):
    """Only failed or dead deliveries can be replayed."""

    def __init__(self, delivery: WebhookDelivery):
        super().__init__(f"delivery {delivery.id} is {delivery.status}; only failed or dead deliveries can be replayed")
        self.delivery = delivery


def _storable_id(value: int) -> bool:
    return isinstance(value, int) and 0 < value < 2**63


class WebhookDeliveries:
    """Admin operations on ``WebhookDelivery`` rows (the dispatcher sends them: ``webhooks``)."""

    def __init__(self, sessions: sessionmaker[Session], *, retry_seconds: float = 86400.0):
        self._sessions = sessions
        self.retry_seconds = retry_seconds

    def get(self, delivery_id: int) -> WebhookDelivery | None:
        if not _storable_id(delivery_id):
            return None
        with self._sessions() as session:
            return session.get(WebhookDelivery, delivery_id)

    def given_up(
        self, statuses: tuple[str, ...] = GIVEN_UP, *, job_id: int | None = None, page: int = 1, per_page: int = 50,
    ) -> tuple[list[WebhookDelivery], int]:
        """One page of the deliveries in ``statuses`` (failed and/or dead), newest give-up first,
        and how many there are in all. Rows from before ``gave_up_at`` existed gave up at their
        last ``next_attempt_at`` (the old code set it to the time of the last try)."""
        if job_id is not None and not _storable_id(job_id):
            return [], 0
        where: list[Any] = [WebhookDelivery.status.in_(statuses)]
        if job_id is not None:
            where.append(WebhookDelivery.job_id == job_id)
        when = func.coalesce(WebhookDelivery.gave_up_at, WebhookDelivery.next_attempt_at)
        with self._sessions() as session:
            total = session.scalar(select(func.count()).select_from(WebhookDelivery).where(*where)) or 0
            rows = list(session.scalars(
                select(WebhookDelivery).where(*where).order_by(when.desc(), WebhookDelivery.id.desc())
                .offset((page - 1) * per_page).limit(per_page)
            ))
        return rows, total

    def dead_count(self) -> int:
        with self._sessions() as session:
            return session.scalar(
                select(func.count()).select_from(WebhookDelivery)
                .where(WebhookDelivery.status == DeliveryStatus.DEAD.value)
            ) or 0

    def _fresh(self) -> dict[str, Any]:
        now = utcnow()
        return {
            "status": DeliveryStatus.PENDING.value, "attempts": 0, "next_attempt_at": now,
            "give_up_at": now + timedelta(seconds=self.retry_seconds), "gave_up_at": None, "claim_token": None,
            "replays": WebhookDelivery.replays + 1,
        }

    def replay(self, delivery_id: int) -> WebhookDelivery:
        """Put a failed or dead delivery back to pending, due now. Raises LookupError for an
        unknown id, :class:`ReplayRefused` for one that is pending or delivered."""
        if not _storable_id(delivery_id):
            raise LookupError(delivery_id)
        with self._sessions.begin() as session:
            changed = rowcount(session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status.in_(GIVEN_UP))
                .values(**self._fresh())
                .execution_options(synchronize_session=False)
            ))
        row = self.get(delivery_id)
        if row is None:
            raise LookupError(delivery_id)
        if not changed:
            raise ReplayRefused(row)
        return row

    def replay_dead(self, job_id: int | None = None) -> list[int]:
        """Replay every dead delivery (of one job, with ``job_id``); returns their ids, oldest
        first. Failed ones (refused by their receiver) are replayed one by one, on purpose."""
        if job_id is not None and not _storable_id(job_id):
            return []
        query = select(WebhookDelivery.id).where(WebhookDelivery.status == DeliveryStatus.DEAD.value)
        if job_id is not None:
            query = query.where(WebhookDelivery.job_id == job_id)
        with self._sessions() as session:
            candidates = list(session.scalars(query.order_by(WebhookDelivery.id)))
        replayed = []
        with self._sessions.begin() as session:
            for delivery_id in candidates:
                if rowcount(session.execute(
                    update(WebhookDelivery)
                    .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == DeliveryStatus.DEAD.value)
                    .values(**self._fresh())
                    .execution_options(synchronize_session=False)
                )):
                    replayed.append(delivery_id)
        return replayed
