"""django-q2 entry points: one line each, the engine does the work."""

from pipeline import executor, recovery, units


def stage_execute(stage_id: int) -> None:
    executor.stage_execute(stage_id)


def units_work(stage_id: int) -> None:
    units.units_work(stage_id, worker=executor.worker_name())


def sweep() -> None:
    recovery.sweep()
