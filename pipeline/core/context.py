"""What a stage function sees while it runs one attempt (`StageContext`), and what a unit
function of a stage that fans out sees while it does one unit (`UnitContext`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import IO, Any

from pipeline.core import store
from pipeline.core.artifacts import artifact_prefix, attempt_artifacts_discard, attempt_dir
from pipeline.core.leases import Heartbeat, LeaseKeeper
from pipeline.core.workflow import OutputT, StageRef, workflow_get

# How many attempts this process runs side by side. A Temporal worker runs several on threads
# (`attempts_per_process_set`, from its concurrency); a django-q2 worker runs one (its
# cluster's concurrency is processes). A stage that sizes a thread pool or a model by the
# work beside it reads `ctx.attempts_per_process`.
_attempts_per_process = 1


def attempts_per_process_set(count: int) -> None:
    """Said once by a worker process that runs several attempts on threads."""
    global _attempts_per_process
    _attempts_per_process = max(1, count)


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

    def output(self, ref: StageRef[OutputT]) -> OutputT:
        """The committed output of an earlier stage (a fork's reused one included), as the
        model that stage declares."""
        if ref.name not in self._earlier_outputs:
            raise KeyError(f"stage {ref.name!r} has no committed output before this one")
        spec = workflow_get(self.claim.workflow).stage(ref.name)
        return spec.output_load(self._earlier_outputs[ref.name], ref.output)

    @property
    def attempts_per_process(self) -> int:
        """How many attempts this process runs side by side, this one included."""
        return _attempts_per_process

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


class UnitContext:
    """What a unit function sees: its input, the run's input, and its lease."""

    def __init__(self, claim: store.UnitClaim, keeper: LeaseKeeper) -> None:
        self.claim = claim
        self._keeper = keeper

    @property
    def input(self) -> dict[str, Any]:
        return self.claim.input

    @property
    def run_input(self) -> dict[str, Any]:
        return self.claim.run_input

    @property
    def attempts_per_process(self) -> int:
        """How many attempts this process runs side by side (see `StageContext`)."""
        return _attempts_per_process

    def heartbeat(self) -> None:
        """Raise if this worker no longer holds the unit; call it between pieces of work."""
        self._keeper.check()
        store.unit_heartbeat(self.claim)
