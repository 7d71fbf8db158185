"""Writes of the clinical domain. Views, commands and admin actions call these."""

from __future__ import annotations

import re
import uuid
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.core.files import File
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction
from django.template.defaultfilters import filesizeformat
from django.utils import timezone

from pipeline import (
    MODEL_INPUT,
    OperationRefused,
    Operator,
    RunStatus,
    models_check,
    run_cancel,
    run_create,
    run_of_subject,
    run_rerun_from,
    run_retry_failed,
    run_skip_backoff,
    run_start,
    runs_of_subject,
)
from visits.errors import SUPPORTED_FORMATS, RecordingRejected
from visits.models import ClinicianVocabulary, Visit
from visits.privacy.audit import Action, audit_record, current_origin
from visits.privacy.consent import ConsentGiven, consent_record, consent_required
from visits.refs import NOTE_DELIVERY
from visits.selectors import visit_note_signed
from visits.speech.vocabulary import vocabulary_prompt
from visits.stages import VISIT_WORKFLOW

if TYPE_CHECKING:
    from django.contrib.auth.models import AnonymousUser, User

    from pipeline import Run

RECORDING_EXTENSIONS = frozenset(
    {".wav", ".mp3", ".m4a", ".aac", ".mp4", ".ogg", ".oga", ".opus", ".flac", ".webm"}
)


def recording_validate(*, name: str, size: int) -> None:
    """Refuse what is certainly not a recording we can take, before storing anything."""
    extension = PurePath(name).suffix.lower()
    if extension not in RECORDING_EXTENSIONS:
        raise RecordingRejected(
            f"“{extension or 'no extension'}” is not a recording format we accept. "
            f"Upload a {SUPPORTED_FORMATS} file."
        )
    if size > settings.RECORDING_MAX_BYTES:
        raise RecordingRejected(
            f"The file is {filesizeformat(size)}; the limit is "
            f"{filesizeformat(settings.RECORDING_MAX_BYTES)}. Split the recording and upload "
            "the parts as separate visits."
        )


# An identifier, not a description: letters, digits and . _ : / | - only, so that no name or
# free text (which would carry spaces) lands in a field that travels to the EHR.
_REF = re.compile(r"[A-Za-z0-9._:/|-]{1,64}")


def visit_ref_validate(value: str, *, what: str) -> str:
    """An opaque EHR identifier (MRN, FHIR id), stripped; empty is allowed."""
    value = value.strip()
    if value and not _REF.fullmatch(value):
        raise RecordingRejected(
            f"The {what} “{value[:80]}” is not an identifier: use the EHR's id (letters, digits "
            "and . _ : / | - only, at most 64), never a name."
        )
    return value


def visit_create(
    *,
    clinician: User,
    recording: UploadedFile | Path,
    label: str = "",
    patient_ref: str = "",
    encounter_ref: str = "",
    whisper_prompt: str | None = None,
    consent: ConsentGiven | None = None,
) -> Visit:
    """Store the recording privately, create the visit and its first run (not yet started).
    The transcription's prompt is the clinician's vocabulary unless `whisper_prompt` says;
    `consent` is the patient's (`privacy.consent.consent_required`)."""
    consent = consent_required(consent)
    if isinstance(recording, Path):
        name, size = recording.name, recording.stat().st_size
    else:
        name, size = recording.name or "", recording.size or 0
    recording_validate(name=name, size=size)
    visit = _visit_new(
        clinician=clinician,
        label=label,
        recording_name=name,
        recording_bytes=size,
        patient_ref=patient_ref,
        encounter_ref=encounter_ref,
    )
    # The file is copied in chunks before the transaction: a failed insert leaves only an
    # unreferenced file, never a visit pointing at a half-written one.
    if isinstance(recording, Path):
        with recording.open("rb") as handle:
            visit.recording.save(name, File(handle), save=False)
    else:
        visit.recording.save(name, recording, save=False)
    try:
        _visit_insert(
            visit,
            consent=consent,
            run_input={"recording": visit.recording.name},
            whisper_prompt=whisper_prompt,
        )
    except BaseException:
        visit.recording.delete(save=False)
        raise
    return visit


def visit_create_live(
    *,
    clinician: User,
    recording_session: uuid.UUID,
    pieces_folder: str,
    recording_format: str,
    label: str = "",
    patient_ref: str = "",
    encounter_ref: str = "",
    consent: ConsentGiven | None = None,
) -> Visit:
    """Create the visit of a recording that is starting now, and its run: the pieces arriving
    in `pieces_folder` (storage-relative) are transcribed as they come
    (`visits.capture.browser_recordings`)."""
    consent = consent_required(consent)
    visit = _visit_new(
        clinician=clinician,
        label=label,
        recording_name=f"browser-recording.{recording_format}",
        recording_bytes=0,
        patient_ref=patient_ref,
        encounter_ref=encounter_ref,
    )
    visit.recording_session = recording_session
    _visit_insert(
        visit,
        consent=consent,
        run_input={"recording_pieces": pieces_folder, "recording_format": recording_format},
        whisper_prompt=None,
    )
    return visit


def _visit_new(
    *, clinician: User, label: str, patient_ref: str, encounter_ref: str, **rest: Any
) -> Visit:
    return Visit(
        clinician=clinician,
        label=label[:200],
        patient_ref=visit_ref_validate(patient_ref, what="patient reference"),
        encounter_ref=visit_ref_validate(encounter_ref, what="encounter reference"),
        **rest,
    )


def _visit_insert(
    visit: Visit, *, consent: ConsentGiven, run_input: dict[str, Any], whisper_prompt: str | None
) -> None:
    """Save the new visit with its consent and its first run, in one transaction."""
    with transaction.atomic():
        visit.save()
        consent_record(visit, consent)
        visit.current_run = run_create(
            workflow=VISIT_WORKFLOW,
            subject=visit.subject,
            input={
                **run_input,
                # Fixed now, so that every attempt and re-run transcribes alike.
                "whisper_prompt": clinician_vocabulary_prompt(visit.clinician)
                if whisper_prompt is None
                else whisper_prompt,
            },
        )
        visit.save(update_fields=["current_run"])


def clinician_vocabulary_prompt(clinician: User) -> str:
    """The transcription prompt for a new visit of `clinician`: their specialty's lexicon and
    their own words; empty when they have set neither."""
    found = ClinicianVocabulary.objects.filter(clinician=clinician).first()
    if found is None or not (found.specialty or found.word_list()):
        return ""
    return vocabulary_prompt(found.specialty, found.word_list())


def visit_start(*, visit: Visit, inline: bool = False) -> None:
    """Start (or resume) the visit's current run: on the cluster, or here to the end."""
    run = visit.current_run
    if run is None:
        return
    run_start(run, inline=inline)


# --- operating a visit's pipeline (admin actions and `reprocess`) ---------------------------

REPROCESS_PERMISSION = "visits.reprocess_visit"


def _operator(actor: User | AnonymousUser | None, *, visit: Visit, action: str) -> Operator:
    """Staff with the reprocess permission, or a command line (actor None, named by its
    --actor); anyone else, anonymous included, is refused, and the refusal is recorded."""
    if actor is None:
        origin = current_origin()
        return Operator(user=origin.actor, label=origin.operator_label)
    if not (actor.is_active and actor.is_staff and actor.has_perm(REPROCESS_PERMISSION)):
        refusal = "Retrying, re-running or cancelling needs the reprocess permission."
        audit_record(action, user=actor, visit=visit, refused=refusal)
        raise PermissionDenied(refusal)
    return Operator.for_user(actor)


def visit_retry(
    *, visit: Visit, actor: User | AnonymousUser | None, reason: str, inline: bool = False
) -> None:
    """One more attempt at the failed stage of the visit's current run."""
    operator = _operator(actor, visit=visit, action=Action.RETRY)
    run = _current_run(visit)
    run_retry_failed(run=run, operator=operator, reason=reason, inline=inline)
    audit_record(Action.RETRY, user=actor, visit=visit, run_id=run.pk, reason=reason)


def visit_skip_backoff(*, visit: Visit, actor: User | AnonymousUser | None, reason: str) -> None:
    """Run now: the waiting stage of the visit's current run is tried without more delay."""
    operator = _operator(actor, visit=visit, action=Action.RUN_NOW)
    run = _current_run(visit)
    run_skip_backoff(run=run, operator=operator, reason=reason)
    audit_record(Action.RUN_NOW, user=actor, visit=visit, run_id=run.pk, reason=reason)


def rerun_model_check(*, stage: str, model: str) -> None:
    """Refuse, before any run is made, a re-run from `stage` under `model` that the stage or
    a later one would refuse (not allowed by its policy, or not priced)."""
    names = VISIT_WORKFLOW.stage_names
    later = names[names.index(stage) :] if stage in names else []
    models_check(VISIT_WORKFLOW.name, later, model, timezone.now().date())


def visit_rerun_from(
    *,
    visit: Visit,
    stage: str,
    actor: User | AnonymousUser | None,
    reason: str,
    inline: bool = False,
    model: str | None = None,
    label: str = "",
) -> None:
    """A new run from `stage`; it becomes the visit's current run, the old one stays readable
    (its note is an earlier version; a signed one is never touched). With `model` the new run
    asks that LLM (which must be priced); `label` names the batch, for `compare`."""
    operator = _operator(actor, visit=visit, action=Action.RERUN)
    if model:
        rerun_model_check(stage=stage, model=model)
    with transaction.atomic():
        # Two operators re-running the visit at once: the second waits here for the first,
        # then finds the run it saw replaced, and is refused rather than forking again.
        locked = Visit.objects.select_for_update().only("current_run").get(pk=visit.pk)
        if locked.current_run_id != visit.current_run_id:
            raise OperationRefused(
                f"Visit {visit.pk} was re-run meanwhile (its run is now {locked.current_run_id}"
                "); look at that run before re-running it again."
            )
        fork = run_rerun_from(
            run=_current_run(visit),
            stage_name=stage,
            operator=operator,
            reason=reason,
            start=False,
            input_changes={MODEL_INPUT: model} if model else None,
            label=label,
        )
        visit.current_run = fork
        visit.save(update_fields=["current_run"])
        audit_record(
            Action.RERUN,
            user=actor,
            visit=visit,
            run_id=fork.pk,
            reason=reason,
            detail=f"from {stage}" + (f" with {model}" if model else ""),
        )
    visit_start(visit=visit, inline=inline)


def delivery_retry(
    *, visit: Visit, run_id: int, actor: User | AnonymousUser | None, reason: str
) -> None:
    """One more attempt at a failed delivery of the visit's note to the EHR."""
    operator = _operator(actor, visit=visit, action=Action.RETRY_DELIVERY)
    run = run_of_subject(visit.subject, run_id)
    if run is None or run.workflow != NOTE_DELIVERY:
        raise OperationRefused(f"Visit {visit.pk} has no delivery run {run_id}.")
    run_retry_failed(run=run, operator=operator, reason=reason)
    audit_record(Action.RETRY_DELIVERY, user=actor, visit=visit, run_id=run.pk, reason=reason)


def visit_retry_deliveries(
    *, visit: Visit, actor: User | AnonymousUser | None, reason: str
) -> list[Run]:
    """Retry every failed delivery of the visit's signed note versions to the EHR."""
    _operator(actor, visit=visit, action=Action.RETRY_DELIVERY)
    failed = [
        run
        for run in runs_of_subject(visit.subject)
        if run.workflow == NOTE_DELIVERY and run.status == RunStatus.FAILED
    ]
    if not failed:
        raise OperationRefused(f"Visit {visit.pk} has no failed delivery to the EHR.")
    for run in failed:
        delivery_retry(visit=visit, run_id=run.pk, actor=actor, reason=reason)
    return failed


def visit_cancel(*, visit: Visit, actor: User | AnonymousUser | None, reason: str) -> None:
    operator = _operator(actor, visit=visit, action=Action.CANCEL)
    run = _current_run(visit)
    run_cancel(run=run, operator=operator, reason=reason)
    audit_record(Action.CANCEL, user=actor, visit=visit, run_id=run.pk, reason=reason)


def _current_run(visit: Visit) -> Run:
    if visit.purged_at is not None:
        raise OperationRefused(
            f"Visit {visit.pk} was purged on {visit.purged_at:%Y-%m-%d} under the retention "
            "policy: its recording and transcript are gone, so nothing can be retried or re-run."
        )
    if visit.current_run is None:
        raise OperationRefused(f"Visit {visit.pk} has no run.")
    return visit.current_run


def visit_refs_update(
    *, visit: Visit, clinician: User, patient_ref: str, encounter_ref: str
) -> Visit:
    """The visit's clinician corrects its EHR references, until a version of its note is
    signed (they are part of what was sent to the EHR)."""
    if visit.clinician_id != clinician.pk:
        raise PermissionDenied("Only the visit's clinician can change its references.")
    if visit_note_signed(visit):
        raise OperationRefused(
            "The note is signed: its references are part of what was signed and cannot change."
        )
    visit.patient_ref = visit_ref_validate(patient_ref, what="patient reference")
    visit.encounter_ref = visit_ref_validate(encounter_ref, what="encounter reference")
    with transaction.atomic():
        visit.save(update_fields=["patient_ref", "encounter_ref"])
        audit_record(Action.CHANGE_REFS, user=clinician, visit=visit)
    return visit


def service_clinician(username: str | None, *, service_account: str) -> User:
    """Who owns the visits a command makes: the user `username`, who must exist, or a service
    account (created on first use, with no usable password, so nobody can log in as it)."""
    users = get_user_model()
    if username is None:
        user, created = users.objects.get_or_create(username=service_account)
        if created:
            user.set_unusable_password()
            user.save(update_fields=["password"])
        return user
    try:
        return users.objects.get(username=username)
    except users.DoesNotExist:
        raise OperationRefused(
            f"No user named “{username}”. Create one with `manage.py createsuperuser` or "
            f"`manage.py demo_setup`, or leave out --clinician to use “{service_account}”."
        ) from None
