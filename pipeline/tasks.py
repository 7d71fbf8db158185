"""django-q2 entry points: one line each, the engine does the work."""

from pipeline import executor, recovery


def stage_execute(stage_id: int) -> None:
    executor.stage_execute(stage_id)


def sweep() -> None:
    recovery.sweep()
