"""The clinical domain's tables. Pipeline state lives in `pipeline`; a visit points at it."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import PurePath

from django.conf import settings
from django.db import models

from pipeline import Run
from visits.schemas import ChartNote


def recording_upload_to(instance: Visit, filename: str) -> str:
    # The stored name carries no PHI: a random id and the original extension only.
    return f"recordings/{uuid.uuid4().hex}{PurePath(filename).suffix.lower()[:8]}"


class Visit(models.Model):
    clinician = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="visits"
    )
    label = models.CharField(max_length=200, blank=True)
    # Empty while a browser recording is still being made: its pieces are joined here at Stop.
    recording = models.FileField(upload_to=recording_upload_to, max_length=255, blank=True)
    recording_name = models.CharField(max_length=255)
    recording_bytes = models.PositiveBigIntegerField()
    current_run = models.ForeignKey(
        Run, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    # Opaque identifiers in the EHR (an MRN, a FHIR id): never a name. Checked by
    # `visits.services.visit_ref_validate`.
    patient_ref = models.CharField(max_length=64, blank=True)
    encounter_ref = models.CharField(max_length=64, blank=True)
    # Set for a recording made in the browser: its session, so that sending it twice makes
    # one visit.
    recording_session = models.UUIDField(null=True, blank=True, unique=True, editable=False)
    # A browser recording is a visit from its first second: when its last piece arrived (to
    # tell a live recording from an interrupted one), and when Stop sealed it.
    pieces_received_at = models.DateTimeField(null=True, blank=True, editable=False)
    recording_stopped_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    # When its PHI (recording, audio, transcript, summaries, model answers) was deleted under
    # the retention policy (`privacy.retention`); the row, the signed note and the trail stay.
    purged_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["clinician", "-created_at"], name="visit_clinician_idx")]
        permissions = [("reprocess_visit", "Can retry, re-run or cancel a visit's pipeline")]

    def __str__(self) -> str:
        return f"visit {self.pk}"

    @property
    def subject(self) -> str:
        """How the engine knows this visit's runs."""
        return visit_subject(self.pk)


VISIT_SUBJECT_PREFIX = "visit:"


class RecordingConsent(models.Model):
    """The patient's consent to ambient recording of one visit, recorded before any capture;
    and its withdrawal, which stops the visit's pipeline and purges what it recorded."""

    class Method(models.TextChoices):
        VERBAL = "verbal", "verbal, attested by the clinician"
        WRITTEN = "written", "written"
        ELSEWHERE = "elsewhere", "collected outside this application (CONSENT_COLLECTED_ELSEWHERE)"
        SYNTHETIC = "synthetic", "no patient: a synthetic recording (demo, evaluation)"

    visit = models.OneToOneField(Visit, on_delete=models.PROTECT, related_name="consent")
    method = models.CharField(max_length=16, choices=Method.choices)
    attested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.PROTECT, related_name="+"
    )
    attested_at = models.DateTimeField()
    # Others in the room (a parent, an interpreter), as roles: never a name.
    others_present = models.CharField(max_length=200, blank=True)
    withdrawn_at = models.DateTimeField(null=True, blank=True)
    withdrawn_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    withdrawal_reason = models.CharField(max_length=500, blank=True)

    def __str__(self) -> str:
        state = "withdrawn" if self.withdrawn_at else "given"
        return f"consent to record visit {self.visit_id}: {self.method}, {state}"

    @property
    def active(self) -> bool:
        return self.withdrawn_at is None


def visit_subject(visit_id: int) -> str:
    return f"{VISIT_SUBJECT_PREFIX}{visit_id}"


def visit_id_of_subject(subject: str) -> int:
    """The visit a run belongs to (the inverse of `visit_subject`)."""
    return int(subject.removeprefix(VISIT_SUBJECT_PREFIX))


def _specialty_choices() -> list[tuple[str, str]]:
    from visits.speech.vocabulary import specialties

    return [(name, name) for name in specialties()]


class ClinicianVocabulary(models.Model):
    """A clinician's specialty and own words (local drug names, colleagues, abbreviations),
    told to the transcription of each of their visits (`visits.speech.vocabulary`)."""

    clinician = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="vocabulary"
    )
    specialty = models.CharField(max_length=64, blank=True, choices=_specialty_choices)
    words = models.TextField(
        blank=True,
        help_text="One word or phrase per line, most important first; the first ones are kept "
        "when the list is longer than the transcription can take.",
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "clinician vocabularies"

    def __str__(self) -> str:
        return f"vocabulary of {self.clinician}"

    def word_list(self) -> list[str]:
        return [line.strip() for line in self.words.splitlines() if line.strip()]


class NoteVersion(models.Model):
    """One version of a visit's note. Each finished note stage adds the model's draft (version
    1 for the first run); each save by the clinician adds the next. A version is never changed
    once written, except to sign it; a signed version's content is sealed by `content_sha256`,
    so a later change to the stored row is detectable (`notes.versions.note_version_intact`)."""

    class Kind(models.TextChoices):
        DRAFT = "draft", "model draft"
        EDIT = "edit", "clinician edit"
        AMENDMENT = "amendment", "amendment"

    visit = models.ForeignKey(Visit, on_delete=models.PROTECT, related_name="note_versions")
    number = models.PositiveIntegerField()
    kind = models.CharField(max_length=16, choices=Kind.choices)
    # The run whose draft this version descends from; its summary and transcript are the
    # evidence the version's lines cite.
    run = models.ForeignKey(Run, on_delete=models.PROTECT, related_name="+")
    based_on = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    engine = models.CharField(max_length=100)  # what drafted the lines it started from
    content = models.JSONField()  # a `visits.schemas.ChartNote`
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="empty for the model's draft",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    # Why a signed note was changed: required for an amendment.
    reason = models.TextField(blank=True)
    signed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    signed_at = models.DateTimeField(null=True, blank=True)
    content_sha256 = models.CharField(max_length=64, blank=True)

    class Meta:
        ordering = ["visit", "number"]
        constraints = [
            models.UniqueConstraint(fields=["visit", "number"], name="note_version_number_unique"),
            # One model draft per run: a retried note stage cannot add its draft twice.
            models.UniqueConstraint(
                fields=["run"],
                condition=models.Q(kind="draft"),
                name="note_version_one_draft_per_run",
            ),
            models.CheckConstraint(
                condition=(
                    models.Q(signed_by__isnull=True, signed_at__isnull=True, content_sha256="")
                    | models.Q(signed_by__isnull=False, signed_at__isnull=False)
                    & ~models.Q(content_sha256="")
                ),
                name="note_version_signature_whole",
            ),
        ]

    def __str__(self) -> str:
        return f"note version {self.number} of visit {self.visit_id}"

    @property
    def note(self) -> ChartNote:
        return ChartNote.model_validate(self.content)

    @property
    def is_signed(self) -> bool:
        return self.signed_at is not None

    @property
    def is_intact(self) -> bool:
        """False when a signed version's stored content no longer matches its seal."""
        return not self.is_signed or self.seal() == self.content_sha256

    def seal(self) -> str:
        """SHA-256 over the visit, the version number and the content as stored, in one fixed
        form (sorted keys, no spaces). The stored JSON, not the model's reading of it: a field
        added to the model later must not break the seal of what was signed before."""
        canonical = json.dumps(self.content, sort_keys=True, separators=(",", ":"))
        sealed = f"visit:{self.visit_id}:note:{self.number}:{canonical}"
        return hashlib.sha256(sealed.encode()).hexdigest()


class AccessEvent(models.Model):
    """The audit trail (HIPAA 164.312(b); the fields of ASTM E2147): who viewed, took out or
    changed a visit's PHI, who signed in, out or was refused; when, from where, on behalf of
    whom, why, and whether it was allowed.

    Append-only: written once by `privacy.audit`, never changed. The admin offers no change or
    delete, and on PostgreSQL a trigger (migration 0007) refuses UPDATE and DELETE."""

    class Action(models.TextChoices):
        VIEW_VISIT = "view_visit", "viewed the visit"
        VIEW_NOTE = "view_note", "viewed a version of the note"
        VIEW_HISTORY = "view_history", "viewed the visit's history"
        VIEW_ADMIN = "view_admin", "viewed the visit in the admin"
        VIEW_STATUS = "view_status", "printed the visit's status (command line)"
        PLAY_RECORDING = "play_recording", "played or downloaded the recording"
        EXPORT_FHIR = "export_fhir", "exported the note as FHIR"
        PRINT_SUMMARY = "print_summary", "opened the after-visit summary to print"
        EDIT_NOTE = "edit_note", "saved a version of the note"
        AMEND_NOTE = "amend_note", "amended the signed note"
        SIGN_NOTE = "sign_note", "signed the note"
        CHANGE_REFS = "change_refs", "changed the EHR references"
        RETRY = "retry", "retried the failed stage"
        RUN_NOW = "run_now", "ran the waiting stage now"
        RERUN = "rerun", "re-ran the pipeline from a stage"
        CANCEL = "cancel", "cancelled the run"
        RETRY_DELIVERY = "retry_delivery", "retried the delivery to the EHR"
        PURGE = "purge", "purged the visit's PHI under the retention policy"
        CONSENT = "consent", "recorded the patient's consent to recording"
        WITHDRAW_CONSENT = "withdraw_consent", "recorded the withdrawal of consent"
        RECORD = "record", "started recording the visit"
        STOP_RECORDING = "stop_recording", "stopped recording the visit"
        LOGIN = "login", "signed in"
        LOGIN_FAILED = "login_failed", "failed to sign in"
        LOGOUT = "logout", "signed out"
        LOCKOUT = "lockout", "was locked out after failed sign-ins"

    class Outcome(models.TextChoices):
        ALLOWED = "allowed", "allowed"
        REFUSED = "refused", "refused"

    # Empty for what concerns no visit (signing in and out). PROTECT: the trail outlives
    # nothing it names; a visit is purged of its PHI, never deleted from under its trail.
    visit = models.ForeignKey(
        Visit, null=True, blank=True, on_delete=models.PROTECT, related_name="access_events"
    )
    action = models.CharField(max_length=32, choices=Action.choices)
    note_version = models.PositiveIntegerField(null=True, blank=True)
    run_id = models.PositiveBigIntegerField(null=True, blank=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    # The user's name (or, for a command line, the name given with --actor; for a failed
    # sign-in, the name typed): kept even if the user row goes.
    actor_label = models.CharField(max_length=150)
    # The operating-system login a command ran under, beside the --actor it names.
    os_user = models.CharField(max_length=64, blank=True)
    reason = models.CharField(max_length=500, blank=True)
    outcome = models.CharField(max_length=16, choices=Outcome.choices, default=Outcome.ALLOWED)
    detail = models.CharField(max_length=300, blank=True)
    ip = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        permissions = [("view_audit", "Can read and export the audit trail")]
        indexes = [
            models.Index(fields=["visit", "-created_at"], name="access_event_visit_idx"),
            models.Index(fields=["actor", "-created_at"], name="access_event_actor_idx"),
        ]

    def __str__(self) -> str:
        where = f" (visit {self.visit_id})" if self.visit_id else ""
        return f"{self.actor_label} {self.get_action_display()}{where}"
