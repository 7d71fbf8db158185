"""A raw django-q2 task hop, the baseline of the stage-gap benchmark (runs inside a cluster).

Each task writes how long it waited between being enqueued and starting, then enqueues the
next one (on the next queue of `queues`, round robin) until `remaining` reaches 0."""

from __future__ import annotations

import time


def hop(remaining: int, enqueued_at: float, out_path: str, queues: list[str]) -> None:
    started = time.time()
    with open(out_path, "a") as handle:
        handle.write(f"{started - enqueued_at:.6f}\n")
    if remaining <= 0:
        return
    from django_q.tasks import async_task

    queue = queues[0] if queues else ""
    options: dict[str, object] = {"task_name": f"hop-{remaining}", "timeout": 60}
    if queue:
        options["cluster"] = queue
    rotated = queues[1:] + queues[:1]
    async_task("bench.hop.hop", remaining - 1, time.time(), out_path, rotated, q_options=options)
