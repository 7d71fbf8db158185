"""The patient's consent to ambient recording: recorded before any capture, withdrawable at any
time. No consent, no capture: a visit is created only with one (`consent_required`), or under
`CONSENT_COLLECTED_ELSEWHERE`, which is recorded as such on every visit.

Withdrawal cancels the visit's run through the engine, so nothing more is sent to any model,
and purges what was recorded through the retention path (`privacy.retention.visit_purge`):
pieces, recording, decoded audio, transcript, checkpoints and drafts. The visit row, the
consent and its withdrawal, and the audit trail stay."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.utils import timezone

from pipeline import FINAL_RUN_STATUSES, OperationRefused, Operator, run_cancel
from visits.errors import RecordingRejected
from visits.models import NoteVersion, RecordingConsent, Visit
from visits.privacy.audit import Action, audit_record
from visits.privacy.retention import visit_purge
from visits.schemas import ChartNote, ChartSOAP

if TYPE_CHECKING:
    from django.contrib.auth.models import User

Method = RecordingConsent.Method

# What a clinician may attest in the app; the other methods are set by the deployment or a
# synthetic recording, never chosen on a form.
ATTESTED_METHODS = (Method.VERBAL, Method.WRITTEN)


class ConsentMissing(RecordingRejected):
    code = "consent_missing"


@dataclass(frozen=True)
class ConsentGiven:
    """What the clinician attests before recording: how the patient consented, and who else is
    in the room (roles, never names)."""

    method: str
    attested_by: User | None
    others_present: str = ""


# A generated recording (the demo's, the evaluation set's) has no patient to ask.
SYNTHETIC_CONSENT = ConsentGiven(method=Method.SYNTHETIC, attested_by=None)


WITHDRAWN_ENGINE = "deleted: consent withdrawn"
WITHDRAWN_DRAFT = ChartNote(
    soap=ChartSOAP(subjective=[], objective=[], assessment=[], plan=[]), patient_summary=[]
)


def consent_required(consent: ConsentGiven | None) -> ConsentGiven:
    """The consent a new visit is created with: the one given, or, under
    `CONSENT_COLLECTED_ELSEWHERE`, that fact; otherwise the visit is refused."""
    if consent is not None:
        if consent.method not in Method.values:
            raise ConsentMissing(
                f"“{consent.method}” is not a way of consenting; say verbal or written."
            )
        return consent
    if settings.CONSENT_COLLECTED_ELSEWHERE:
        return ConsentGiven(method=Method.ELSEWHERE, attested_by=None)
    raise ConsentMissing(
        "Record the patient's consent to recording first (verbal, attested by you, or "
        "written); without it nothing is recorded or processed."
    )


def consent_record(visit: Visit, consent: ConsentGiven) -> RecordingConsent:
    """Keep the visit's consent and say so in the audit trail (inside the visit's creation)."""
    row = RecordingConsent.objects.create(
        visit=visit,
        method=consent.method,
        attested_by=consent.attested_by,
        attested_at=timezone.now(),
        others_present=consent.others_present.strip()[:200],
    )
    audit_record(
        Action.CONSENT,
        user=consent.attested_by,
        visit=visit,
        detail=f"method {row.method}"
        + (f"; also present: {row.others_present}" if row.others_present else ""),
    )
    return row


def consent_withdraw(*, visit: Visit, actor: User, reason: str) -> RecordingConsent:
    """The patient withdrew consent: stop the visit's pipeline and purge what it recorded."""
    if actor.pk != visit.clinician_id and not actor.has_perm("visits.change_visit"):
        raise PermissionDenied("Only the visit's clinician may withdraw the patient's consent.")
    reason = reason.strip() or "the patient withdrew consent to recording"
    with transaction.atomic():
        consent = RecordingConsent.objects.select_for_update().get(visit=visit)
        if consent.withdrawn_at is not None:
            raise OperationRefused(
                f"Consent for visit {visit.pk} was already withdrawn on "
                f"{consent.withdrawn_at:%Y-%m-%d %H:%M}."
            )
        consent.withdrawn_at = timezone.now()
        consent.withdrawn_by = actor
        consent.withdrawal_reason = reason[:500]
        consent.save(update_fields=["withdrawn_at", "withdrawn_by", "withdrawal_reason"])
        visit.refresh_from_db()
        run = visit.current_run
        if run is not None and run.status not in FINAL_RUN_STATUSES:
            run_cancel(run=run, operator=Operator.for_user(actor), reason="consent withdrawn")
        audit_record(Action.WITHDRAW_CONSENT, user=actor, visit=visit, reason=reason)
        if visit.recording_session and visit.recording_stopped_at is None:
            Visit.objects.filter(pk=visit.pk).update(recording_stopped_at=timezone.now())
        if visit.purged_at is None:
            visit_purge(visit, reason=f"consent withdrawn: {reason}", actor=actor, permitted=True)
        # The drafts' lines go too; a signed version is the chart's record, made while consent
        # stood, and stays.
        NoteVersion.objects.filter(visit=visit, signed_at__isnull=True).update(
            content=WITHDRAWN_DRAFT.model_dump(mode="json"), engine=WITHDRAWN_ENGINE
        )
    return consent
