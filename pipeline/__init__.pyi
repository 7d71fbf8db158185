# The public API, for type checkers and for the lazy loader in __init__.py: each name is
# imported from the module that defines it, and `X as X` says it is exported (PEP 484).
from .core.artifacts import (
    artifact_path as artifact_path,
    stage_dirs_delete as stage_dirs_delete,
    stage_dirs_of_subject as stage_dirs_of_subject,
    storage_relative as storage_relative,
)
from .core.context import (
    StageContext as StageContext,
    UnitContext as UnitContext,
)
from .core.errors import (
    BudgetExceeded as BudgetExceeded,
    OperationRefused as OperationRefused,
    OutputInvalid as OutputInvalid,
    PermanentError as PermanentError,
    PipelineError as PipelineError,
    TransientError as TransientError,
)
from .core.models import (
    Attempt as Attempt,
    Run as Run,
    Stage as Stage,
)
from .core.operations import (
    Operator as Operator,
    run_cancel as run_cancel,
    run_rerun_from as run_rerun_from,
    run_rerun_plan as run_rerun_plan,
    run_retry_failed as run_retry_failed,
    run_retry_plan as run_retry_plan,
    run_skip_backoff as run_skip_backoff,
    run_start as run_start,
)
from .core.policy import (
    RetryPolicy as RetryPolicy,
    http_status_is_transient as http_status_is_transient,
    retry_after_seconds as retry_after_seconds,
)
from .core.selectors import (
    audit_entries_of_subject as audit_entries_of_subject,
    failed_error_codes as failed_error_codes,
    filter_failed_at as filter_failed_at,
    output_of as output_of,
    run_input_users as run_input_users,
    run_input_values as run_input_values,
    run_of_subject as run_of_subject,
    run_stages as run_stages,
    runs_erasable as runs_erasable,
    runs_labelled as runs_labelled,
    runs_of_subject as runs_of_subject,
    runs_with_stages as runs_with_stages,
    stage_output as stage_output,
    stage_token_averages as stage_token_averages,
    stage_units_done as stage_units_done,
    usage_totals as usage_totals,
    with_failed_stage as with_failed_stage,
)
from .core.signals import (
    phi_viewed as phi_viewed,
)
from .core.states import (
    FINAL_RUN_STATUSES as FINAL_RUN_STATUSES,
    FailureKind as FailureKind,
    RunStatus as RunStatus,
    StageStatus as StageStatus,
)
from .core.store import (
    run_create as run_create,
    runs_erase as runs_erase,
)
from .core.units import (
    stream_seal as stream_seal,
    units_run as units_run,
    units_stream as units_stream,
)
from .core.workflow import (
    StageRef as StageRef,
    StageSpec as StageSpec,
    Workflow as Workflow,
    workflow_register as workflow_register,
)
from .llm.gateway import (
    MODEL_INPUT as MODEL_INPUT,
    LLMGateway as LLMGateway,
    llm_enabled as llm_enabled,
)
from .llm.policies import (
    models_check as models_check,
)
from .ops.admin import (
    StageStateFilter as StageStateFilter,
    attempt_duration as attempt_duration,
    run_admin_link as run_admin_link,
)
