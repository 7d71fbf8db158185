"""What a stage function sees while it runs one attempt."""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Self

from django.conf import settings
from django.db import DatabaseError, connection

from pipeline import store
from pipeline.errors import PipelineError
from pipeline.workflow import OutputT, workflow_get

if TYPE_CHECKING:
    from pipeline.llm import LLMGateway

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


class StageContext:
    """The claim, the committed outputs of earlier stages, and the durable helpers."""

    def __init__(self, claim: store.Claim, heartbeat: Heartbeat) -> None:
        self.claim = claim
        self._heartbeat = heartbeat
        self.usage = store.AttemptUsage()

    @property
    def run_id(self) -> int:
        return self.claim.run_id

    @property
    def stage_name(self) -> str:
        return self.claim.stage_name

    @property
    def attempt_number(self) -> int:
        return self.claim.attempt_number

    @property
    def input(self) -> dict[str, Any]:
        return self.claim.run_input

    @cached_property
    def _earlier_outputs(self) -> dict[str, Any]:
        return store.stage_outputs(self.claim.run_id, before_position=self.claim.position)

    def output(self, stage_name: str, as_type: type[OutputT]) -> OutputT:
        """The committed output of an earlier stage (a fork's reused one included), as the
        model that stage declares."""
        if stage_name not in self._earlier_outputs:
            raise KeyError(f"stage {stage_name!r} has no committed output before this one")
        spec = workflow_get(self.claim.workflow).stage(stage_name)
        return spec.output_load(self._earlier_outputs[stage_name], as_type)

    @cached_property
    def llm(self) -> LLMGateway:
        from pipeline.llm import LLMGateway

        return LLMGateway(self)

    def heartbeat(self) -> None:
        """Raise if this attempt no longer owns the stage; call it between pieces of work."""
        self._heartbeat.check()
        store.stage_heartbeat(self.claim)

    def lease_check(self) -> None:
        """Raise if the heartbeat thread found this attempt's lease lost; no database call."""
        self._heartbeat.check()

    def progress(self, done: int, total: int | None = None) -> None:
        """Say how far this attempt has got (`done` of `total` units), for people watching."""
        self._heartbeat.check()
        store.stage_progress_save(self.claim, done=done, total=total)

    def checkpoint_save(self, key: str, value: Any) -> None:
        self._heartbeat.check()
        store.checkpoint_save(self.claim, key=key, value=value)

    def checkpoints(self, prefix: str = "") -> dict[str, Any]:
        return store.checkpoints_load(self.claim, prefix=prefix)

    def units_run(self, items: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        """Fan out: the result of each (key, input) unit, by key, done by the stage's `unit`
        function on this worker and every free one of the stage's queue (`pipeline.units`)."""
        from pipeline.units import units_run

        return units_run(self, items)

    # --- artifacts: large outputs kept in private storage, referenced from the output ---------

    @property
    def attempt_dir(self) -> Path:
        return attempt_dir(self.claim.run_id, self.claim.stage_name, self.claim.attempt_number)

    @contextmanager
    def artifact_writer(self, name: str, mode: str = "wb") -> Iterator[IO[Any]]:
        """Write an artifact atomically: readers see the whole file or none of it."""
        self.attempt_dir.mkdir(parents=True, exist_ok=True)
        final = self.attempt_dir / name
        partial = final.with_name(final.name + ".partial")
        try:
            with open(partial, mode) as handle:
                yield handle
            partial.replace(final)
        finally:
            partial.unlink(missing_ok=True)

    def artifact_ref(self, name: str) -> str:
        """The storage-relative reference kept in the stage output."""
        claim = self.claim
        return f"{artifact_prefix(claim.run_id, claim.stage_name, claim.attempt_number)}/{name}"

    def discard_artifacts(self) -> None:
        """A failed attempt leaves nothing behind."""
        claim = self.claim
        attempt_artifacts_discard(claim.run_id, claim.stage_name, claim.attempt_number)


def storage_root() -> Path:
    return Path(settings.PRIVATE_STORAGE_ROOT)


def artifact_prefix(run_id: int, stage_name: str, attempt_number: int) -> str:
    return f"runs/{run_id}/{stage_name}/attempt-{attempt_number}"


def attempt_dir(run_id: int, stage_name: str, attempt_number: int) -> Path:
    return storage_root() / artifact_prefix(run_id, stage_name, attempt_number)


def attempt_artifacts_discard(run_id: int, stage_name: str, attempt_number: int) -> None:
    """Remove what an attempt wrote. For a worker killed mid-write, the sweep does this: the
    worker never got to. A worker that was only frozen finds its folder gone or is fenced out."""
    shutil.rmtree(attempt_dir(run_id, stage_name, attempt_number), ignore_errors=True)


def artifact_path(ref: str) -> Path:
    """Resolve an artifact reference from a stage output, refusing to leave storage."""
    root = storage_root().resolve()
    path = (root / ref).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"artifact reference escapes private storage: {ref!r}")
    return path
