"""Clinical-domain failures. Each says what is wrong and what the clinician can do."""

from pipeline import PermanentError, PipelineError

SUPPORTED_FORMATS = "WAV, MP3, M4A/AAC, OGG/Opus, FLAC or WebM"


class UnreadableRecording(PermanentError):
    code = "unreadable_recording"


class EmptyRecording(PermanentError):
    code = "empty_recording"


class RecordingTooLong(PermanentError):
    code = "recording_too_long"


class NoSpeechDetected(PermanentError):
    code = "no_speech"


class RecordingRejected(PipelineError):
    """An upload refused before any visit exists (wrong type, too large, empty)."""

    code = "recording_rejected"
