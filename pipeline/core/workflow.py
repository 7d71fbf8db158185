"""How a domain declares its workflow to the engine: an ordered list of stage specs.

Reading a workflow declaration should tell you everything about how it runs: each stage's
function, the model of what it returns, its retry policy and timeout, its non-retryable errors
and the queue it runs on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from django.conf import settings
from pydantic import BaseModel, ValidationError

from pipeline.core.errors import StageOutputInvalid
from pipeline.core.policy import Decision, Failure, RetryPolicy, retry_decision

if TYPE_CHECKING:
    from pipeline.core.context import StageContext, UnitContext
    from pipeline.core.models import Run

StageFunction = Callable[["StageContext"], BaseModel]
# Does one unit of a stage that fans out (`pipeline.core.units`); returns its result as JSON.
UnitFunction = Callable[["UnitContext"], Any]
# Called with the run and the stage's output model inside the transaction that commits the
# output: for rows of the domain's own that must exist exactly when the output does.
SuccessHook = Callable[["Run", Any], None]
OutputT = TypeVar("OutputT", bound=BaseModel)


@dataclass(frozen=True)
class StageRef(Generic[OutputT]):
    """A stage named together with the model it outputs, declared once beside the workflow
    (`SUMMARIZE = StageRef("summarize", SummarizeOutput)`) so that a reader of its output
    (`ctx.output(SUMMARIZE)`, `output_of(stages, SUMMARIZE)`) never pairs the two by hand.
    `Workflow.stage(ref)` refuses a declaration whose output model is not the ref's."""

    name: str
    output: type[OutputT]


@dataclass(frozen=True)
class StageSpec:
    name: str
    run: StageFunction
    policy: RetryPolicy
    # What the stage returns. The engine validates it, stores its JSON and gives readers the
    # model back; system check pipeline.E005 refuses a stage without one.
    output: type[BaseModel] | None = None
    # The django-q2 cluster (queue) this stage is sent to; None is the default cluster. A stage
    # on the same queue as the one before it runs on the same worker right after it.
    queue: str | None = None
    # Shown to people (admin, status pages).
    title: str = ""
    # Runs in the commit of a successful attempt (never for a failed, discarded or reused
    # one); if it raises, the attempt fails and nothing of it is kept.
    on_success: SuccessHook | None = None
    # For a stage that fans out: the function that does one of its units, on any free worker
    # of its queue, when the stage function calls `units_run(ctx, ...)`.
    unit: UnitFunction | None = None
    # How many items of an output a person must review (say, statements its evidence does not
    # show); kept on the stage and counted on the dashboard.
    flagged: Callable[[Any], int] | None = None

    def judge(self, failure: Failure, *, attempts_made: int) -> Decision:
        """Retry or give up, after `attempts_made` attempts the last of which ended in
        `failure`: the stage's policy decides, every wait scaled by `interval_scale()`."""
        return retry_decision(
            self.policy, failure, attempts_made=attempts_made, interval_scale=interval_scale()
        )

    def output_dump(self, value: object) -> dict[str, object]:
        """Validate what the stage function returned against its model; the JSON to store."""
        if self.output is None:
            raise StageOutputInvalid(f"stage {self.name!r} declares no output model")
        try:
            model = self.output.model_validate(value)
        except ValidationError as exc:
            raise StageOutputInvalid(
                f"stage {self.name!r} returned something that is not a "
                f"{self.output.__name__}: {exc.error_count()} error(s), first: "
                f"{exc.errors()[0]['msg']}"
            ) from exc
        return model.model_dump(mode="json")

    def output_load(self, document: object, as_type: type[OutputT]) -> OutputT:
        """The stored JSON of this stage's output, as its model (which must be `as_type`)."""
        if self.output is None or not issubclass(self.output, as_type):
            declared = self.output.__name__ if self.output else "nothing"
            raise TypeError(f"stage {self.name!r} outputs {declared}, not {as_type.__name__}")
        return as_type.model_validate(document)


@dataclass(frozen=True)
class Workflow:
    name: str
    stages: tuple[StageSpec, ...]

    def __post_init__(self) -> None:
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"workflow {self.name!r} declares a stage name twice: {names}")
        if not names:
            raise ValueError(f"workflow {self.name!r} has no stages")

    @property
    def stage_names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    def stage(self, name: str | StageRef[Any]) -> StageSpec:
        wanted = name if isinstance(name, str) else name.name
        for stage in self.stages:
            if stage.name == wanted:
                if isinstance(name, StageRef) and stage.output is not name.output:
                    declared = stage.output.__name__ if stage.output else "nothing"
                    raise TypeError(
                        f"stage {wanted!r} outputs {declared}, not {name.output.__name__}"
                    )
                return stage
        raise KeyError(f"workflow {self.name!r} has no stage {wanted!r}")


_workflows: dict[str, Workflow] = {}


def workflow_register(workflow: Workflow) -> None:
    """Called from a domain app's `ready()`; registering the same name twice replaces it."""
    _workflows[workflow.name] = workflow


def workflow_get(name: str) -> Workflow:
    try:
        return _workflows[name]
    except KeyError:
        raise KeyError(f"no workflow named {name!r} is registered") from None


def stage_spec(workflow: str, stage: str) -> StageSpec:
    """The declaration of one stage of a registered workflow."""
    return workflow_get(workflow).stage(stage)


def interval_scale() -> float:
    """What every retry wait is multiplied by (PIPELINE_RETRY_INTERVAL_SCALE: the tests run
    backoffs at a hundredth of their length), whichever backend waits."""
    return float(settings.PIPELINE_RETRY_INTERVAL_SCALE)


def workflows_all() -> list[Workflow]:
    return list(_workflows.values())
