"""Hearing the visit: transcription with faster-whisper, which model, what to expect."""
