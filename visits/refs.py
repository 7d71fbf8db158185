"""The names of the clinical workflows and of their stages, each stage with the model it
outputs. A leaf module: readers of outputs (selectors, FHIR, evaluation) import it without
importing the stage functions, and so without the cycles that would come with them."""

from pipeline import StageRef
from visits.schemas import (
    DeliveryOutput,
    IngestOutput,
    NoteOutput,
    SummarizeOutput,
    TranscribeOutput,
)

VISIT = "visit"
INGEST = StageRef("ingest", IngestOutput)
TRANSCRIBE = StageRef("transcribe", TranscribeOutput)
SUMMARIZE = StageRef("summarize", SummarizeOutput)
NOTE = StageRef("note", NoteOutput)

NOTE_DELIVERY = "note_delivery"
DELIVER = StageRef("deliver", DeliveryOutput)
