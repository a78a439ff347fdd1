"""Subscription events already seen: each (subscription, event number) is recorded once.

Where it sits: the rest-hook endpoint (:mod:`agent.service.routes_notifications`) records every
event here before it queues anything, so a redelivered or duplicated notification is recognised
however many copies arrive at once. The check is the table's unique constraint, not a read before
a write: two concurrent inserts of one event cannot both succeed on SQLite or PostgreSQL, so the
loser learns it is a duplicate. The row also keeps which summary job the event started, or none
when it was ignored.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from agent.audit.tables import utcnow
from agent.jobs.tables import NotificationEvent


class SeenEvent(BaseModel):
    """One recorded subscription event: references only, never clinical text."""

    subscription: str
    event_number: int
    focus: str | None = None
    job_id: str | None = None
    received_at: datetime


def record_event(engine: Engine, *, subscription: str, event_number: int, focus: str | None) -> tuple[SeenEvent, bool]:
    """Record an event unless it was recorded before.

    Returns:
        The recorded event, and whether this call recorded it (False: a duplicate; the earlier
        record, with the job it started if any, is returned).
    """
    received = utcnow()
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(NotificationEvent).values(
                    subscription=subscription, event_number=event_number, focus=focus, received_at=received
                )
            )
    except IntegrityError:
        existing = get_event(engine, subscription=subscription, event_number=event_number)
        if existing is None:  # the constraint fired for a row we cannot see: not a duplicate of ours
            raise
        return existing, False
    return SeenEvent(subscription=subscription, event_number=event_number, focus=focus, received_at=received), True


#: The columns a :class:`SeenEvent` is read from.
_EVENT_COLUMNS = (
    NotificationEvent.subscription,
    NotificationEvent.event_number,
    NotificationEvent.focus,
    NotificationEvent.job_id,
    NotificationEvent.received_at,
)


def get_event(engine: Engine, *, subscription: str, event_number: int) -> SeenEvent | None:
    """Return the recorded event, or None."""
    with engine.connect() as conn:
        row = conn.execute(
            select(*_EVENT_COLUMNS).where(
                NotificationEvent.subscription == subscription, NotificationEvent.event_number == event_number
            )
        ).first()
    return SeenEvent.model_validate(row._asdict()) if row is not None else None


def attach_job(engine: Engine, *, subscription: str, event_number: int, job_id: str) -> None:
    """Note the summary job an event started (kept when one was noted before)."""
    with engine.begin() as conn:
        conn.execute(
            update(NotificationEvent)
            .where(
                NotificationEvent.subscription == subscription,
                NotificationEvent.event_number == event_number,
                NotificationEvent.job_id.is_(None),
            )
            .values(job_id=job_id)
        )


def list_events(engine: Engine, *, limit: int = 100) -> list[SeenEvent]:
    """Return recorded events, newest first."""
    with engine.connect() as conn:
        rows = conn.execute(select(*_EVENT_COLUMNS).order_by(NotificationEvent.id.desc()).limit(limit)).all()
    return [SeenEvent.model_validate(row._asdict()) for row in rows]
