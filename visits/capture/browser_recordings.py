"""Recordings made in the browser: a visit from the first second, transcribed while it lasts.

Record creates the visit and starts its run (`recording_session_start`), once the patient's
consent is recorded. The browser's MediaRecorder then hands over a piece every few seconds; each
is sent here at once and kept in the browser (IndexedDB) until the server confirms it, so
neither a dropped connection nor a reloaded page loses audio. A piece is stored under its
index, so sending it twice is harmless. The run's `transcribe` stage decodes the pieces as they
arrive and transcribes the audio chunk by chunk while the visit goes on (`visits.stages`).

Stop (`recording_session_finish`) checks that every piece is here, seals the recording (the
decoder then knows its end, and the engine that no more chunks will come), and joins the pieces
in order into the visit's recording file, for playback and retention; only the last chunk,
the summary and the note are left to do.
"""

from __future__ import annotations

import shutil
import uuid
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.files import File
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.template.defaultfilters import filesizeformat
from django.utils import timezone

from pipeline import storage_relative, stream_seal
from visits.errors import RecordingRejected
from visits.models import Visit
from visits.privacy.audit import Action, audit_record
from visits.privacy.consent import ConsentGiven
from visits.refs import TRANSCRIBE
from visits.services import visit_create_live, visit_start
from visits.speech.audio import STREAM_DEMUXERS
from visits.speech.pieces import piece_path, pieces_seal

if TYPE_CHECKING:
    from django.contrib.auth.models import User

# A piece covers a few seconds of Opus (tens of kilobytes); anything near this is no piece.
PIECE_MAX_BYTES = 2 * 1024 * 1024
PIECES_MAX = 100_000

# What MediaRecorder may give, and the extension the decoder expects for it.
MIME_EXTENSIONS = {"audio/webm": ".webm", "audio/ogg": ".ogg", "audio/mp4": ".m4a"}


class RecordingIncomplete(RecordingRejected):
    code = "recording_incomplete"


def _session_dir(clinician: User, session_id: uuid.UUID) -> Path:
    # Under the clinician's own folder: a session id guessed by someone else finds nothing.
    root = Path(settings.PRIVATE_STORAGE_ROOT) / "browser-recordings"
    return root / str(clinician.pk) / session_id.hex


def _stream_format(mime: str) -> str:
    """The live decoder's name for what MediaRecorder records; refused if it cannot stream."""
    extension = MIME_EXTENSIONS.get(mime.split(";")[0].strip().lower())
    if extension is None:
        raise RecordingRejected(
            f"The browser recorded “{mime or 'an unknown format'}”, which we cannot take; "
            "record in a current Chrome, Edge or Firefox, or upload a file instead."
        )
    name = extension.lstrip(".")
    if name not in STREAM_DEMUXERS:
        raise RecordingRejected(
            "This browser records MP4, which cannot be transcribed while it is recorded. "
            "Record in a current Chrome, Edge or Firefox, or upload the file after the visit."
        )
    return name


def _session_visit(clinician: User, session_id: uuid.UUID) -> Visit:
    visit = Visit.objects.filter(recording_session=session_id, clinician=clinician).first()
    if visit is None:
        raise RecordingRejected(
            "This recording was not started here: press Record again to start a visit."
        )
    return visit


def recording_session_start(
    *,
    clinician: User,
    session_id: uuid.UUID,
    mime: str,
    consent: ConsentGiven | None,
    label: str = "",
    patient_ref: str = "",
    encounter_ref: str = "",
) -> Visit:
    """Create the visit of a recording that starts now, and start its run; the same visit for
    a session already started (a resent request)."""
    started = Visit.objects.filter(recording_session=session_id, clinician=clinician).first()
    if started is not None:
        return started
    recording_format = _stream_format(mime)
    folder = _session_dir(clinician, session_id)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        visit = visit_create_live(
            clinician=clinician,
            recording_session=session_id,
            pieces_folder=storage_relative(folder),
            recording_format=recording_format,
            label=label,
            patient_ref=patient_ref,
            encounter_ref=encounter_ref,
            consent=consent,
        )
    except IntegrityError:
        # A second start raced this one and won (or the session is another clinician's).
        return _session_visit(clinician, session_id)
    audit_record(Action.RECORD, user=clinician, visit=visit)
    visit_start(visit=visit)
    return visit


def recording_piece_save(*, clinician: User, session_id: uuid.UUID, index: int, data: bytes) -> int:
    """Keep piece `index` of a recording session; return the bytes kept so far."""
    if not 0 <= index < PIECES_MAX:
        raise RecordingRejected(f"Piece {index} is out of range; pieces count from 0.")
    if not data:
        raise RecordingRejected(f"Piece {index} is empty; send it again.")
    if len(data) > PIECE_MAX_BYTES:
        raise RecordingRejected(
            f"Piece {index} is {filesizeformat(len(data))}; a piece may be at most "
            f"{filesizeformat(PIECE_MAX_BYTES)}."
        )
    visit = _session_visit(clinician, session_id)
    if visit.recording_stopped_at is not None:
        raise RecordingRejected("This recording was stopped; start a new visit for the rest.")
    folder = _session_dir(clinician, session_id)
    previous = piece_path(folder, index)
    # The bytes kept so far are counted on the visit, not by listing its folder: a piece costs
    # the same at the end of a two-hour visit as at its start.
    replaced = previous.stat().st_size if previous.exists() else 0
    kept = visit.recording_bytes - replaced
    if kept + len(data) > settings.RECORDING_MAX_BYTES:
        raise RecordingRejected(
            f"The recording has passed the {filesizeformat(settings.RECORDING_MAX_BYTES)} "
            "limit. Stop it and start a new visit for the rest."
        )
    # Written aside and renamed, so a piece on disk is always whole.
    partial = previous.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(previous)
    # One write per piece, whatever the length of the visit: what tells live from interrupted.
    Visit.objects.filter(pk=visit.pk).update(
        pieces_received_at=timezone.now(),
        recording_bytes=F("recording_bytes") + len(data) - replaced,
    )
    return kept + len(data)


def pieces_arrived(visit: Visit) -> int:
    """How many pieces of the visit's recording are here without a gap, from the first."""
    assert visit.recording_session is not None
    folder = _session_dir(visit.clinician, visit.recording_session)
    count = 0
    while piece_path(folder, count).exists():
        count += 1
    return count


def recording_session_finish(
    *,
    clinician: User,
    session_id: uuid.UUID,
    pieces: int | None,
    label: str = "",
    abandoned: bool = False,
) -> Visit:
    """Stop the recording at `pieces` pieces (None: those that arrived, for an interrupted
    recording finished from another tab) and seal it; the same visit when already stopped.
    `abandoned`: nobody came back to it (`recordings_abandoned_finish`); with no audio at all
    it is sealed empty, and its run then fails saying so."""
    visit = _session_visit(clinician, session_id)
    folder = _session_dir(clinician, session_id)
    with transaction.atomic():
        visit = Visit.objects.select_for_update().get(pk=visit.pk)
        if visit.recording_stopped_at is not None:
            return visit
        if pieces is None:
            pieces = pieces_arrived(visit)
        if not (0 if abandoned else 1) <= pieces <= PIECES_MAX:
            raise RecordingRejected("The recording has no audio yet; record for a few seconds.")
        missing = [i for i in range(pieces) if not piece_path(folder, i).exists()]
        if missing:
            shown = ", ".join(str(i) for i in missing[:10]) + ("…" if len(missing) > 10 else "")
            raise RecordingIncomplete(
                f"{len(missing)} piece(s) of the recording have not arrived ({shown}). Keep "
                "this page open: they are kept in the browser and will be sent again."
            )
        pieces_seal(folder, pieces)
        if pieces:
            _recording_join(visit, folder, pieces)
        visit.recording_stopped_at = timezone.now()
        if label:
            visit.label = label[:200]
        visit.save(
            update_fields=[
                "recording",
                "recording_bytes",
                "recording_stopped_at",
                "label",
            ]
        )
        audit_record(
            Action.STOP_RECORDING,
            user=None if abandoned else clinician,
            visit=visit,
            detail=f"{pieces} pieces"
            + (
                f"; abandoned: no piece for {settings.RECORDING_ABANDON_MINUTES:g} minutes"
                if abandoned
                else ""
            ),
        )
        if visit.current_run is not None:
            stream_seal(visit.current_run.pk, TRANSCRIBE)
    return visit


def recordings_abandoned_finish() -> list[int]:
    """Finish, with the pieces that arrived, every browser recording whose pieces stopped
    coming `RECORDING_ABANDON_MINUTES` ago and that nobody stopped or withdrew: its
    transcription then ends and frees the worker it holds. The ids of the visits finished (the
    every-minute schedule's task)."""
    cutoff = timezone.now() - timedelta(minutes=settings.RECORDING_ABANDON_MINUTES)
    stale = Visit.objects.filter(
        recording_session__isnull=False,
        recording_stopped_at__isnull=True,
        consent__withdrawn_at__isnull=True,
    ).filter(
        Q(pieces_received_at__lt=cutoff) | Q(pieces_received_at__isnull=True, created_at__lt=cutoff)
    )
    finished = []
    for visit in stale.select_related("clinician"):
        assert visit.recording_session is not None
        recording_session_finish(
            clinician=visit.clinician,
            session_id=visit.recording_session,
            pieces=None,
            abandoned=True,
        )
        finished.append(visit.pk)
    return finished


def _recording_join(visit: Visit, folder: Path, pieces: int) -> None:
    """The pieces in order, as one file: the visit's recording (MediaRecorder's pieces are
    consecutive bytes of one stream). The pieces stay for the transcription still reading them."""
    joined = folder / f"joined{Path(visit.recording_name).suffix}"
    with joined.open("wb") as out:
        for index in range(pieces):
            with piece_path(folder, index).open("rb") as piece:
                shutil.copyfileobj(piece, out)
    try:
        with joined.open("rb") as handle:
            visit.recording.save(visit.recording_name, File(handle), save=False)
        visit.recording_bytes = joined.stat().st_size
    finally:
        joined.unlink(missing_ok=True)
