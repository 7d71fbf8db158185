"""The domain's periodic tasks, on django-q2's scheduler: the retention purge, daily; and
finishing browser recordings nobody came back to, every minute (so that a closed tab does not
hold a transcription worker for hours). Created on every migrate, so they always exist."""

from __future__ import annotations

from typing import Any

PURGE_SCHEDULE_NAME = "visits retention purge"
ABANDONED_SCHEDULE_NAME = "visits abandoned recordings"


def schedules_ensure(**kwargs: Any) -> None:
    """Create or correct the schedules (connected to post_migrate)."""
    from django_q.models import Schedule

    for name, func, every in (
        (PURGE_SCHEDULE_NAME, "visits.privacy.retention.purge_task", Schedule.DAILY),
        (
            ABANDONED_SCHEDULE_NAME,
            "visits.capture.browser_recordings.recordings_abandoned_finish",
            Schedule.MINUTES,
        ),
    ):
        Schedule.objects.update_or_create(
            name=name,
            defaults={"func": func, "schedule_type": every, "minutes": 1, "repeats": -1},
        )
