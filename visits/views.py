"""Thin views: parse the request, call a service or selector, render."""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import FileResponse, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.http import require_GET, require_http_methods

from visits.errors import RecordingRejected
from visits.forms import VisitUploadForm
from visits.selectors import (
    visit_stages,
    visit_status_document,
    visits_of_clinician,
    visits_visible_to,
)
from visits.services import visit_create, visit_start
from visits.uploads import RecordingSizeLimit


@login_required
@require_GET
def visit_list(request: HttpRequest) -> HttpResponse:
    visits = visits_of_clinician(request.user)
    return render(request, "visits/list.html", {"visits": visits[:200]})


@csrf_exempt  # the handler must be installed before CSRF reads the body; checked just below
@login_required
@require_http_methods(["GET", "POST"])
def visit_upload(request: HttpRequest) -> HttpResponse:
    limit = RecordingSizeLimit(request, max_bytes=settings.RECORDING_MAX_BYTES)
    request.upload_handlers.insert(0, limit)
    return _visit_upload(request, limit)


@csrf_protect
def _visit_upload(request: HttpRequest, limit: RecordingSizeLimit) -> HttpResponse:
    if request.method == "GET":
        return render(request, "visits/upload.html", {"form": VisitUploadForm()})
    form = VisitUploadForm(request.POST, request.FILES, too_large=limit.exceeded)
    if form.is_valid():
        try:
            visit = visit_create(
                clinician=request.user,
                recording=form.cleaned_data["recording"],
                label=form.cleaned_data["label"],
            )
        except RecordingRejected as exc:
            form.add_error("recording", str(exc))
        else:
            visit_start(visit=visit)
            messages.success(request, "Recording received; the pipeline has started.")
            return redirect("visits:detail", visit_id=visit.pk)
    return render(request, "visits/upload.html", {"form": form}, status=400)


@login_required
@require_GET
def visit_detail(request: HttpRequest, visit_id: int) -> HttpResponse:
    visit = get_object_or_404(visits_visible_to(request.user), pk=visit_id)
    document = visit_status_document(visit)
    context = {
        "visit": visit,
        "doc": document,
        "stages": visit_stages(visit),
        "live": document["status"] in ("queued", "running"),
    }
    return render(request, "visits/detail.html", context)


@login_required
@require_GET
def visit_recording(request: HttpRequest, visit_id: int) -> FileResponse:
    """The recording, to its clinician and permitted staff only; never cached by proxies."""
    visit = get_object_or_404(visits_visible_to(request.user), pk=visit_id)
    response = FileResponse(
        visit.recording.open("rb"), as_attachment=False, filename=f"visit-{visit.pk}-recording"
    )
    response["Cache-Control"] = "private, no-store"
    return response
