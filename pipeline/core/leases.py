"""Keeping a lease alive: a background thread extends it while the work runs, and the work
learns at its next check that the lease was lost. Attempts hold one on their stage, unit
workers one on their unit; every write they make is fenced on it in any case."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Self

from django.conf import settings
from django.db import DatabaseError, connection

from pipeline.core import store
from pipeline.core.errors import PipelineError

logger = logging.getLogger(__name__)


class LeaseKeeper:
    """Keeps a lease alive from a background thread by calling `beat` every third of the lease.

    When `beat` says the lease is lost (expired, cancelled, re-claimed) or the deadline passed,
    it stops and remembers why; the work learns of it at its next `check()` or fenced write."""

    def __init__(self, beat: Callable[[], None], *, name: str) -> None:
        self._beat = beat
        self._name = name
        self._interval = max(0.05, float(settings.PIPELINE_LEASE_SECONDS) / 3)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.lost: PipelineError | None = None

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self._interval):
                try:
                    self._beat()
                except PipelineError as exc:  # the lease is lost, or the deadline passed
                    self.lost = exc
                    return
                except DatabaseError:
                    # A dropped connection must not kill the heartbeat; the next beat reconnects.
                    logger.warning("%s failed; retrying", self._name)
                    connection.close()
        finally:
            connection.close()

    def check(self) -> None:
        if self.lost is not None:
            raise self.lost


class Heartbeat(LeaseKeeper):
    """Extends an attempt's lease on its stage while the stage works; the completion is fenced
    out in any case once the lease is lost."""

    def __init__(self, claim: store.Claim, *, also: Callable[[], None] | None = None) -> None:
        def beat() -> None:
            store.stage_heartbeat(claim)
            if also is not None:
                also()  # a scheduler's own liveness signal (Temporal's activity heartbeat)

        super().__init__(beat, name="stage-heartbeat")
