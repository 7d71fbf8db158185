"""Thin views: parse the request, call a service or selector, render."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import PurePath
from typing import TYPE_CHECKING

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.http import (
    require_GET,
    require_http_methods,
    require_POST,
    require_safe,
)
from django_htmx.http import HttpResponseClientRedirect

from config.session_policy import session_passive
from pipeline import FINAL_RUN_STATUSES, PipelineError
from visits.capture.browser_recordings import (
    RecordingIncomplete,
    recording_piece_save,
    recording_session_finish,
    recording_session_start,
)
from visits.capture.recording_response import recording_response
from visits.capture.uploads import RecordingSizeLimit
from visits.forms import ConsentForm, VisitRefsForm, VisitUploadForm, note_edits_from_post
from visits.models import Visit
from visits.notes.fhir import FHIR_JSON, NoteTampered, NoteUnresolved, note_bundle_json
from visits.notes.versions import (
    NoteChanged,
    note_apply_edits,
    note_diff,
    note_recheck,
    note_save,
    note_sign,
)
from visits.privacy.audit import Action, audit_record
from visits.privacy.consent import consent_withdraw
from visits.selectors import (
    NoteEntry,
    after_visit_summary,
    live_transcript,
    note_entry_pick,
    note_history,
    transcription_progress,
    visit_history,
    visit_stages,
    visit_status_document,
    visits_of_clinician,
    visits_visible_to,
)
from visits.services import visit_create, visit_refs_update, visit_start

if TYPE_CHECKING:
    from django.contrib.auth.models import User
    from django_htmx.middleware import HtmxDetails


# The list shows the newest visits; older ones are a search away in the admin.
LIST_LIMIT = 200


class AuthenticatedHttpRequest(HttpRequest):
    """The request of a view behind `login_required`: its user is signed in (and, through
    django-htmx's middleware, it says whether our scripts sent it)."""

    user: User
    htmx: HtmxDetails


@login_required
@require_GET
def visit_list(request: AuthenticatedHttpRequest) -> HttpResponse:
    return render(request, "visits/list.html", _list_context(request))


@session_passive
@login_required
@require_GET
def visit_list_rows(request: AuthenticatedHttpRequest) -> HttpResponse:
    """The list's rows alone, polled by the list page while a visit is in progress."""
    return render(request, "visits/_visit_rows.html", _list_context(request))


def _list_context(request: AuthenticatedHttpRequest) -> dict[str, object]:
    visits = list(visits_of_clinician(request.user)[:LIST_LIMIT])
    live = any(
        visit.current_run is None or visit.current_run.status not in FINAL_RUN_STATUSES
        for visit in visits
    )
    return {"visits": visits, "live": live}


@csrf_exempt  # the handler must be installed before CSRF reads the body; checked just below
@login_required
@require_http_methods(["GET", "POST"])
def visit_upload(request: AuthenticatedHttpRequest) -> HttpResponse:
    limit = RecordingSizeLimit(request, max_bytes=settings.RECORDING_MAX_BYTES)
    handlers = request.upload_handlers
    assert isinstance(handlers, list)  # an immutable tuple only once the body has been read
    handlers.insert(0, limit)
    return _visit_upload(request, limit)


@csrf_protect
def _visit_upload(request: AuthenticatedHttpRequest, limit: RecordingSizeLimit) -> HttpResponse:
    if request.method == "GET":
        return render(request, "visits/upload.html", _upload_context(VisitUploadForm()))
    form = VisitUploadForm(request.POST, request.FILES, too_large=limit.exceeded)
    if form.is_valid():
        try:
            visit = visit_create(
                clinician=request.user,
                recording=form.cleaned_data["recording"],
                label=form.cleaned_data["label"],
                patient_ref=form.cleaned_data["patient_ref"],
                encounter_ref=form.cleaned_data["encounter_ref"],
                consent=form.consent(request.user),
            )
        except PipelineError as exc:
            form.add_error("recording", str(exc))
        else:
            visit_start(visit=visit)
            messages.success(request, "Recording received; the pipeline has started.")
            if request.htmx:
                # The upload script sent it: it goes to the visit itself, so the message above
                # is shown there and not spent on a redirect the script would follow.
                return HttpResponseClientRedirect(reverse("visits:detail", args=[visit.pk]))
            return redirect("visits:detail", visit_id=visit.pk)
    return render(request, "visits/upload.html", _upload_context(form), status=400)


def _upload_context(form: VisitUploadForm) -> dict[str, object]:
    """The form, and the limits stated before anyone uploads."""
    return {
        "form": form,
        # The recorder's own copy of the consent questions (its ids apart from the form's).
        "consent_form": ConsentForm(auto_id="record-%s"),
        "max_bytes": settings.RECORDING_MAX_BYTES,
        "max_hours": round(settings.RECORDING_MAX_SECONDS / 3600, 1),
    }


@login_required
@require_POST
def recording_piece(
    request: AuthenticatedHttpRequest, session_id: uuid.UUID, index: int
) -> JsonResponse:
    """One piece of a recording being made in the browser (the raw bytes are the body)."""
    try:
        kept = recording_piece_save(
            clinician=request.user, session_id=session_id, index=index, data=request.body
        )
    except PipelineError as exc:
        return JsonResponse({"error": str(exc), "code": exc.code}, status=400)
    return JsonResponse({"index": index, "bytes": kept})


@login_required
@require_POST
def recording_start(request: AuthenticatedHttpRequest, session_id: uuid.UUID) -> JsonResponse:
    """Record pressed: with the patient's consent, the visit and its run exist from now on."""
    form = ConsentForm(request.POST)
    if not form.is_valid():
        return JsonResponse(
            {"error": " ".join(str(e) for errors in form.errors.values() for e in errors)},
            status=400,
        )
    try:
        visit = recording_session_start(
            clinician=request.user,
            session_id=session_id,
            mime=request.POST.get("mime", ""),
            consent=form.consent(request.user),
            label=request.POST.get("label", ""),
        )
    except PipelineError as exc:
        return JsonResponse({"error": str(exc), "code": exc.code}, status=400)
    return JsonResponse(
        {
            "visit": visit.pk,
            "url": reverse("visits:detail", args=[visit.pk]),
            "transcript_url": reverse("visits:live_transcript", args=[visit.pk]),
        }
    )


@login_required
@require_POST
def recording_finish(request: AuthenticatedHttpRequest, session_id: uuid.UUID) -> JsonResponse:
    """Recording stopped: every piece is here; seal it, so only the tail is left to do."""
    try:
        pieces = int(request.POST.get("pieces", ""))
    except ValueError:
        return JsonResponse({"error": "Say how many pieces were recorded."}, status=400)
    try:
        visit = recording_session_finish(
            clinician=request.user,
            session_id=session_id,
            pieces=pieces,
            label=request.POST.get("label", ""),
        )
    except PipelineError as exc:
        # 409: the pieces may still come; anything else is final for this session.
        status = 409 if isinstance(exc, RecordingIncomplete) else 400
        return JsonResponse({"error": str(exc), "code": exc.code}, status=status)
    return JsonResponse({"visit": visit.pk, "url": reverse("visits:detail", args=[visit.pk])})


@login_required
@require_POST
def visit_recording_finish(request: AuthenticatedHttpRequest, visit_id: int) -> HttpResponse:
    """An interrupted recording, finished from its visit page with the pieces that arrived."""
    visit = _visit_for(request, visit_id, Action.STOP_RECORDING, record=False)
    session = visit.recording_session
    if session is None:
        raise Http404("This visit was not recorded in the browser.")
    return _act_on_visit(
        request,
        visit,
        lambda: recording_session_finish(clinician=request.user, session_id=session, pieces=None),
        done="Recording finished with the audio that arrived; the note is on its way.",
    )


@session_passive
@login_required
@require_GET
def visit_live_transcript(request: AuthenticatedHttpRequest, visit_id: int) -> JsonResponse:
    """The transcript so far of a visit being recorded, polled by the recorder every few
    seconds. The first poll of a visit in a session is recorded in the audit trail; the rest
    are the same look."""
    seen = f"live-transcript-{visit_id}"
    visit = _visit_for(request, visit_id, Action.VIEW_VISIT, record=seen not in request.session)
    request.session[seen] = True
    return JsonResponse(live_transcript(visit).model_dump(mode="json"))


@login_required
@require_POST
def consent_withdraw_view(request: AuthenticatedHttpRequest, visit_id: int) -> HttpResponse:
    visit = _visit_for(request, visit_id, Action.WITHDRAW_CONSENT, record=False)
    return _act_on_visit(
        request,
        visit,
        lambda: consent_withdraw(
            visit=visit, actor=request.user, reason=request.POST.get("reason", "")
        ),
        done="Consent withdrawn: the pipeline was stopped and the recording, transcript and "
        "drafts were deleted.",
    )


@login_required
@require_GET
def visit_detail(request: AuthenticatedHttpRequest, visit_id: int) -> HttpResponse:
    visit = _visit_for(request, visit_id, Action.VIEW_VISIT)
    return render(request, "visits/detail.html", _visit_context(request, visit))


@session_passive
@login_required
@require_GET
def visit_live(request: AuthenticatedHttpRequest, visit_id: int) -> HttpResponse:
    """The visit page's body alone: polled by htmx while the pipeline runs, and swapped in
    place. Once the run is final the fragment carries no trigger, so polling stops."""
    # The page's first load was recorded; its polls are the same look, not new ones.
    visit = _visit_for(request, visit_id, Action.VIEW_VISIT, record=False)
    return render(request, "visits/_visit_live.html", _visit_context(request, visit))


def _visit_for(
    request: AuthenticatedHttpRequest,
    visit_id: int,
    action: str,
    *,
    record: bool = True,
    version: int | None = None,
) -> Visit:
    """The visit, if the user may see it, with the look recorded in the audit trail (when
    `record`: actions that change something are recorded by their service). Otherwise 404,
    and the attempt is recorded as refused: someone probing others' visits shows in the
    trail."""
    visit = visits_visible_to(request.user).filter(pk=visit_id).first()
    if visit is None:
        other = Visit.objects.filter(pk=visit_id).first()
        audit_record(
            action,
            user=request.user,
            visit=other,
            refused="not this user's visit" if other else f"there is no visit {visit_id}",
        )
        raise Http404("No such visit.")
    if record:
        audit_record(action, user=request.user, visit=visit, version=version)
    return visit


def _visit_context(request: AuthenticatedHttpRequest, visit: Visit) -> dict[str, object]:
    stages = visit_stages(visit)
    history = note_history(visit)
    document = visit_status_document(visit, stages, history)
    latest = history[-1] if history else None
    delivered = {delivery.version: delivery for delivery in document.deliveries}
    return {
        "visit": visit,
        "doc": document,
        "stages": stages,
        "progress": transcription_progress(stages),
        # Poll while the pipeline or a delivery to the EHR is still under way.
        "live": document.status not in FINAL_RUN_STATUSES
        or any(d.status not in FINAL_RUN_STATUSES for d in document.deliveries),
        "history": history,
        "latest": latest,
        "signed": next((e for e in reversed(history) if e.status == "signed"), None),
        # Newest first, each with its (latest) delivery to the EHR, if any.
        "version_rows": [
            (entry, delivered.get(entry.version.number)) for entry in reversed(history)
        ],
        "is_owner": visit.clinician_id == request.user.pk,
        "consent": getattr(visit, "consent", None),
        # A visit still being recorded: what has been heard so far (the transcript comes later).
        "heard": live_transcript(visit)
        if document.recording in ("recording", "interrupted") and document.transcript is None
        else None,
        "live_chunk_seconds": settings.TRANSCRIBE_LIVE_CHUNK_SECONDS,
        "idle_minutes": settings.RECORDING_IDLE_MINUTES,
        "needs_reason": latest is not None
        and not latest.version.is_signed
        and not latest.version.reason
        and any(e.version.is_signed for e in history),
        **_comparison(request, history),
    }


def _comparison(request: HttpRequest, history: list[NoteEntry]) -> dict[str, object]:
    """?compare=N&to=M picks two note versions by number; anything else compares nothing."""
    by_number = {str(entry.version.number): entry for entry in history}
    older = by_number.get(request.GET.get("compare", ""))
    newer = by_number.get(request.GET.get("to", ""))
    if older is None or newer is None:
        return {}
    return {
        "diff": note_diff(older.version.note, newer.version.note),
        "diff_from": older,
        "diff_to": newer,
    }


@login_required
@require_GET
def visit_timeline(request: AuthenticatedHttpRequest, visit_id: int) -> HttpResponse:
    """Everything that happened to the visit, newest first: runs, operators' actions, note
    versions, signatures, deliveries, exports and prints."""
    visit = _visit_for(request, visit_id, Action.VIEW_HISTORY)
    return render(request, "visits/history.html", {"visit": visit, "events": visit_history(visit)})


@login_required
@require_GET
def note_version_detail(
    request: AuthenticatedHttpRequest, visit_id: int, number: int
) -> HttpResponse:
    """One version of the note, whole, with what changed since the version before it."""
    visit = _visit_for(request, visit_id, Action.VIEW_NOTE, version=number)
    history = note_history(visit)
    entry = next((e for e in history if e.version.number == number), None)
    if entry is None:
        messages.error(request, f"The note has no version {number}.")
        return redirect("visits:detail", visit_id=visit.pk)
    before = next((e for e in history if e.version.number == number - 1), None)
    context = {
        "visit": visit,
        "entry": entry,
        "diff": note_diff(before.version.note, entry.version.note) if before else None,
        "diff_from": before,
    }
    return render(request, "visits/note_version.html", context)


@login_required
@require_http_methods(["GET", "POST"])
def note_edit(request: AuthenticatedHttpRequest, visit_id: int) -> HttpResponse:
    """The clinician edits the latest version; saving makes the next one. A save based on a
    version that is no longer the latest is refused, and the page shows both what they typed
    and what changed meanwhile, so nothing is lost."""
    visit = _visit_for(request, visit_id, Action.EDIT_NOTE, record=False)
    if visit.clinician_id != request.user.pk:
        messages.error(request, "Only the visit's clinician can edit its note.")
        return redirect("visits:detail", visit_id=visit.pk)
    history = note_history(visit)
    if not history:
        messages.error(request, "There is no note to edit yet: the pipeline has not made one.")
        return redirect("visits:detail", visit_id=visit.pk)
    latest = history[-1]
    context: dict[str, object] = {"visit": visit, "entry": latest, "reason": ""}
    if request.method == "GET":
        audit_record(
            Action.VIEW_NOTE, user=request.user, visit=visit, version=latest.version.number
        )
    if request.method == "POST":
        base = next(
            (e for e in history if str(e.version.number) == request.POST.get("base", "")), None
        )
        if base is None:
            messages.error(request, "The form names no version of this note; start again.")
            return redirect("visits:note_edit", visit_id=visit.pk)
        edits = note_edits_from_post(request.POST, base.version.note)
        reason = request.POST.get("reason", "")
        try:
            version = note_save(
                visit=visit,
                clinician=request.user,
                base_number=base.version.number,
                edits=edits,
                reason=reason,
            )
        except NoteChanged as exc:
            messages.error(request, str(exc))
            context |= {
                "reason": reason,
                "yours": note_diff(
                    base.version.note,
                    note_apply_edits(base.version.note, edits, note_recheck(base.version)),
                ),
                "theirs": note_diff(base.version.note, exc.latest.note),
                "base": base,
            }
            return render(request, "visits/note_edit.html", context, status=409)
        except (PipelineError, PermissionDenied) as exc:
            messages.error(request, str(exc))
            context["reason"] = reason
            return render(request, "visits/note_edit.html", context, status=400)
        messages.success(
            request,
            f"Saved as version {version.number}."
            + (" Sign it to file the amendment." if version.kind == "amendment" else ""),
        )
        return redirect("visits:detail", visit_id=visit.pk)
    return render(request, "visits/note_edit.html", context)


@login_required
@require_POST
def note_sign_view(request: AuthenticatedHttpRequest, visit_id: int) -> HttpResponse:
    visit = _visit_for(request, visit_id, Action.SIGN_NOTE, record=False)
    number = request.POST.get("version", "")
    if not number.isdigit():
        messages.error(request, "Choose a version of the note to sign.")
        return redirect("visits:detail", visit_id=visit.pk)
    return _act_on_visit(
        request,
        visit,
        lambda: note_sign(
            visit=visit,
            clinician=request.user,
            number=int(number),
            reason=request.POST.get("reason", ""),
        ),
        done=f"Version {number} signed."
        + (" It is being sent to the EHR." if settings.FHIR_BASE_URL else ""),
    )


def _act_on_visit(
    request: AuthenticatedHttpRequest, visit: Visit, action: Callable[[], object], *, done: str
) -> HttpResponse:
    """Do a clinician's action on the visit and go back to its page, saying what happened.
    This is where the views turn a refusal (ours or a permission) into words."""
    try:
        action()
    except (PipelineError, PermissionDenied) as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, done)
    return redirect("visits:detail", visit_id=visit.pk)


@login_required
@require_GET
def visit_after_visit_summary(request: AuthenticatedHttpRequest, visit_id: int) -> HttpResponse:
    """The patient's printable summary of the latest note version; a draft prints as such."""
    visit = _visit_for(request, visit_id, Action.PRINT_SUMMARY, record=False)
    history = note_history(visit)
    if not history:
        messages.error(request, "There is no note yet to summarise for the patient.")
        return redirect("visits:detail", visit_id=visit.pk)
    version = history[-1].version
    if not version.is_intact:
        refusal = (
            f"Version {version.number} changed after it was signed: it is not printed as a "
            "signed summary. Tell your privacy officer."
        )
        audit_record(
            Action.PRINT_SUMMARY,
            user=request.user,
            visit=visit,
            version=version.number,
            refused=refusal,
        )
        messages.error(request, refusal)
        return redirect("visits:detail", visit_id=visit.pk)
    audit_record(Action.PRINT_SUMMARY, user=request.user, visit=visit, version=version.number)
    context = {"visit": visit, "summary": after_visit_summary(version), "version": version}
    response = render(request, "visits/after_visit_summary.html", context)
    response["Cache-Control"] = "private, no-store"
    return response


@login_required
@require_GET
def visit_fhir(request: AuthenticatedHttpRequest, visit_id: int) -> HttpResponse:
    """The latest note version (or `?version=N`) as a FHIR R4 document Bundle."""
    visit = _visit_for(request, visit_id, Action.EXPORT_FHIR, record=False)
    asked = request.GET.get("version")
    try:
        entry = note_entry_pick(visit, asked)
        bundle = note_bundle_json(entry)
    except PipelineError as exc:
        audit_record(
            Action.EXPORT_FHIR,
            user=request.user,
            visit=visit,
            version=int(asked) if asked and asked.isdigit() else None,
            refused=str(exc),
        )
        status = 409 if isinstance(exc, (NoteTampered, NoteUnresolved)) else 404
        return JsonResponse({"error": str(exc), "code": exc.code}, status=status)
    audit_record(Action.EXPORT_FHIR, user=request.user, visit=visit, version=entry.version.number)
    response = HttpResponse(bundle, content_type=FHIR_JSON)
    response["Cache-Control"] = "private, no-store"
    response["Content-Disposition"] = (
        f'attachment; filename="visit-{visit.pk}-note-{entry.version.number}.fhir.json"'
    )
    return response


@login_required
@require_POST
def visit_refs(request: AuthenticatedHttpRequest, visit_id: int) -> HttpResponse:
    """The clinician corrects the visit's EHR references (until the note is signed)."""
    visit = _visit_for(request, visit_id, Action.CHANGE_REFS, record=False)
    form = VisitRefsForm(request.POST)
    if not form.is_valid():
        for message in form.errors.get_json_data().values():
            messages.error(request, " ".join(error["message"] for error in message))
        return redirect("visits:detail", visit_id=visit.pk)
    return _act_on_visit(
        request,
        visit,
        lambda: visit_refs_update(visit=visit, clinician=request.user, **form.cleaned_data),
        done="References saved.",
    )


@login_required
@require_safe
def visit_recording(request: AuthenticatedHttpRequest, visit_id: int) -> HttpResponseBase:
    """The recording, to its clinician and permitted staff only; never cached; seekable (HTTP
    ranges), so the player can start at any cited segment. Every request is recorded, with
    the part asked for: a seek in the player is a new look at the recording."""
    visit = _visit_for(request, visit_id, Action.PLAY_RECORDING, record=False)
    if visit.purged_at is not None:
        refusal = f"The recording was deleted on {visit.purged_at:%Y-%m-%d} (retention policy)."
        audit_record(Action.PLAY_RECORDING, user=request.user, visit=visit, refused=refusal)
        return HttpResponse(refusal, status=410, content_type="text/plain; charset=utf-8")
    if not visit.recording:
        return HttpResponse(
            "The recording is still being made; it can be played once it is stopped.",
            status=409,
            content_type="text/plain; charset=utf-8",
        )
    audit_record(
        Action.PLAY_RECORDING,
        user=request.user,
        visit=visit,
        detail=request.headers.get("Range", "whole file"),
    )
    extension = PurePath(visit.recording.name).suffix
    return recording_response(
        request, visit.recording, filename=f"visit-{visit.pk}-recording{extension}"
    )
