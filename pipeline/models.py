"""Where Django looks for the app's tables. They live with the layer that owns them: the
engine's in `pipeline.core.models`, the model gateway's governance in `pipeline.llm.models`."""

from pipeline.core.models import (
    Attempt,
    AuditEntry,
    Checkpoint,
    LLMCall,
    Run,
    Stage,
    Unit,
)
from pipeline.llm.models import ModelPolicy, ModelPrice

__all__ = [
    "Attempt",
    "AuditEntry",
    "Checkpoint",
    "LLMCall",
    "ModelPolicy",
    "ModelPrice",
    "Run",
    "Stage",
    "Unit",
]
