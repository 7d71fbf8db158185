"""The process that serves Temporal task queues (`manage.py temporal_worker`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Sequence

from django.conf import settings
from temporalio.client import Client
from temporalio.worker import Worker

from pipeline.backends.temporal.activities import next_stage, stage_attempt, units_work
from pipeline.backends.temporal.client import control_queue
from pipeline.backends.temporal.workflow import PipelineRunWorkflow, StageUnitsWorkflow
from pipeline.core import context


async def _client_when_up(wait_seconds: float) -> Client:
    """A client, once Temporal answers (a worker may start before its server)."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            return await Client.connect(
                settings.TEMPORAL_ADDRESS, namespace=settings.TEMPORAL_NAMESPACE
            )
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _workers_run(queues: Sequence[str], concurrency: int, wait_seconds: float) -> None:
    client = await _client_when_up(wait_seconds)
    # Each queue's worker may run `concurrency` activities: the pool has a thread for every
    # one of them, or an accepted activity would wait for a thread without heartbeating.
    slots = concurrency * len(queues)
    with concurrent.futures.ThreadPoolExecutor(max_workers=slots) as pool:
        workers = [
            Worker(
                client,
                task_queue=queue,
                workflows=[PipelineRunWorkflow, StageUnitsWorkflow]
                if queue == control_queue()
                else [],
                activities=[next_stage, stage_attempt, units_work],
                activity_executor=pool,
                max_concurrent_activities=concurrency,
            )
            for queue in queues
        ]
        await asyncio.gather(*(worker.run() for worker in workers))


def workers_run(queues: Sequence[str], *, concurrency: int, wait_seconds: float = 60) -> None:
    """Serve Temporal task queues until interrupted (`manage.py temporal_worker`), once the
    server answers (within `wait_seconds`)."""
    context.attempts_per_process_set(concurrency * len(queues))
    asyncio.run(_workers_run(queues, concurrency, wait_seconds))
