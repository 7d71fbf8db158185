"""Keeps the recovery sweep on django-q2's scheduler."""

from __future__ import annotations

import math
from typing import Any

from django.conf import settings

SWEEP_SCHEDULE_NAME = "pipeline recovery sweep"


def sweep_schedule_ensure(**kwargs: Any) -> None:
    """Create or update the sweep schedule (connected to post_migrate, so it always exists).

    django-q2's scheduler counts in whole minutes and wakes about every 30 seconds; for a
    tighter bound run `manage.py pipeline_sweep --every SECONDS` beside the cluster."""
    from django_q.models import Schedule

    minutes = max(1, math.ceil(settings.PIPELINE_SWEEP_SECONDS / 60))
    Schedule.objects.update_or_create(
        name=SWEEP_SCHEDULE_NAME,
        defaults={
            "func": "pipeline.tasks.sweep",
            "schedule_type": Schedule.MINUTES,
            "minutes": minutes,
            "repeats": -1,
        },
    )
