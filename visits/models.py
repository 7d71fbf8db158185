"""The clinical domain's tables. Pipeline state lives in `pipeline`; a visit points at it."""

from __future__ import annotations

import uuid
from pathlib import PurePath

from django.conf import settings
from django.db import models

from pipeline.models import Run


def recording_upload_to(instance: Visit, filename: str) -> str:
    # The stored name carries no PHI: a random id and the original extension only.
    return f"recordings/{uuid.uuid4().hex}{PurePath(filename).suffix.lower()[:8]}"


class Visit(models.Model):
    clinician = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="visits"
    )
    label = models.CharField(max_length=200, blank=True)
    recording = models.FileField(upload_to=recording_upload_to, max_length=255)
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
    created_at = models.DateTimeField(auto_now_add=True)

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


def visit_subject(visit_id: int) -> str:
    return f"visit:{visit_id}"


class NoteSignature(models.Model):
    """A clinician's signature on one version of a visit's note (the note of one run).

    A re-run never touches it: it makes a new run, so a new, unsigned version."""

    visit = models.ForeignKey(Visit, on_delete=models.PROTECT, related_name="signatures")
    run = models.OneToOneField(Run, on_delete=models.PROTECT, related_name="+")
    signed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+"
    )
    signed_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-signed_at"]

    def __str__(self) -> str:
        return f"note of run {self.run_id} signed by {self.signed_by_id}"
