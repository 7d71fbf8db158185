"""Recordings made in the browser, received piece by piece while the clinician records.

The browser's MediaRecorder hands over a piece every few seconds; each is sent here at once and
kept in the browser (IndexedDB) until the server confirms it, so neither a dropped connection
nor a reloaded page loses audio. A piece is stored under its index, so sending it twice is
harmless. When recording stops, `recording_session_finish` checks that every piece is here,
joins them in order into one file (MediaRecorder's pieces are consecutive bytes of one stream)
and creates the visit from it, exactly once per session (the database holds the session id
unique on the visit).
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import IntegrityError
from django.template.defaultfilters import filesizeformat

from visits.errors import RecordingRejected
from visits.models import Visit
from visits.services import visit_create, visit_start

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


def _piece_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.piece"


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
    if Visit.objects.filter(recording_session=session_id).exists():
        raise RecordingRejected("This recording was already sent and made into a visit.")
    folder = _session_dir(clinician, session_id)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    kept = sum(path.stat().st_size for path in folder.glob("*.piece"))
    previous = _piece_path(folder, index)
    kept -= previous.stat().st_size if previous.exists() else 0
    if kept + len(data) > settings.RECORDING_MAX_BYTES:
        raise RecordingRejected(
            f"The recording has passed the {filesizeformat(settings.RECORDING_MAX_BYTES)} "
            "limit. Stop it and start a new visit for the rest."
        )
    # Written aside and renamed, so a piece on disk is always whole.
    partial = previous.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(previous)
    return kept + len(data)


def recording_session_finish(
    *, clinician: User, session_id: uuid.UUID, pieces: int, mime: str, label: str = ""
) -> Visit:
    """Join the session's pieces into one recording and create and start its visit. Calling it
    again for a finished session returns the same visit."""
    done = Visit.objects.filter(recording_session=session_id, clinician=clinician).first()
    if done is not None:
        return done
    folder = _session_dir(clinician, session_id)
    extension = MIME_EXTENSIONS.get(mime.split(";")[0].strip().lower())
    if extension is None:
        raise RecordingRejected(
            f"The browser recorded “{mime or 'an unknown format'}”, which we cannot take; "
            "record in a current Chrome, Edge or Firefox, or upload a file instead."
        )
    if pieces < 1:
        raise RecordingRejected("The recording has no audio yet; record for a few seconds.")
    missing = [i for i in range(pieces) if not _piece_path(folder, i).exists()]
    if missing:
        shown = ", ".join(str(i) for i in missing[:10]) + ("…" if len(missing) > 10 else "")
        raise RecordingIncomplete(
            f"{len(missing)} piece(s) of the recording have not arrived ({shown}). Keep this "
            "page open: they are kept in the browser and will be sent again."
        )
    joined = folder / f"browser-recording{extension}"
    with joined.open("wb") as out:
        for index in range(pieces):
            with _piece_path(folder, index).open("rb") as piece:
                shutil.copyfileobj(piece, out)
    try:
        visit = visit_create(
            clinician=clinician, recording=joined, label=label, recording_session=session_id
        )
    except IntegrityError:
        # A second finish raced this one and won: its visit is the recording's.
        return Visit.objects.get(recording_session=session_id, clinician=clinician)
    finally:
        joined.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    visit_start(visit=visit)
    return visit
