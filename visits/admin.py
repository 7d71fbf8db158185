"""The on-call view of visits: filters that answer real questions, audited actions, and each
visit's pipeline (every run, stage and attempt) on its page, with the same actions as buttons."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse

from pipeline import (
    FailureKind,
    PipelineError,
    StageStateFilter,
    attempt_duration,
    failed_error_codes,
    filter_failed_at,
    run_admin_link,
    run_stages,
    runs_of_subject,
    with_failed_stage,
)
from visits.models import AccessEvent, ClinicianVocabulary, Visit
from visits.privacy.audit import (
    AUDIT_PERMISSION,
    CSV_COLUMNS,
    Action,
    audit_csv_write,
    audit_record,
)
from visits.privacy.retention import PURGE_PERMISSION, visit_purge
from visits.services import (
    REPROCESS_PERMISSION,
    visit_cancel,
    visit_rerun_from,
    visit_retry,
    visit_retry_deliveries,
    visit_skip_backoff,
)
from visits.speech.vocabulary import vocabulary_prompt
from visits.stages import VISIT_WORKFLOW

if TYPE_CHECKING:
    from pipeline import Attempt, Run, Stage


class VisitStateFilter(StageStateFilter):
    title = "pipeline state"
    prefix = "current_run__stages__"


class FailedStageFilter(admin.SimpleListFilter):
    title = "failed at stage"
    parameter_name = "failed_stage"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(name, name) for name in VISIT_WORKFLOW.stage_names]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Visit]) -> QuerySet[Visit]:
        if self.value() is None:
            return queryset
        return filter_failed_at(queryset, via="current_run", stage_name=self.value())


class FailureKindFilter(admin.SimpleListFilter):
    title = "how it failed"
    parameter_name = "failure"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return list(FailureKind.choices)

    def queryset(self, request: HttpRequest, queryset: QuerySet[Visit]) -> QuerySet[Visit]:
        if self.value() is None:
            return queryset
        return filter_failed_at(queryset, via="current_run", failure_kind=self.value())


class ErrorTypeFilter(admin.SimpleListFilter):
    title = "error type"
    parameter_name = "error"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(code, code) for code in failed_error_codes()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Visit]) -> QuerySet[Visit]:
        if self.value() is None:
            return queryset
        return filter_failed_at(queryset, via="current_run", error_code=self.value())


class ReasonForm(forms.Form):
    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text="Kept in the audit trail with your name and the time.",
    )


class RerunForm(ReasonForm):
    stage = forms.ChoiceField(
        choices=[(name, name) for name in VISIT_WORKFLOW.stage_names],
        help_text="This stage and every stage after it run anew; earlier outputs are reused.",
    )


# --- operating a visit's pipeline: from the list (actions) or from its page (buttons) --------


@dataclass(frozen=True)
class Operation:
    """One thing the on-call admin may do to a visit's pipeline. `name` is the admin action's
    name and the last part of the operation's URL on a visit's page."""

    name: str
    title: str
    form_class: type[ReasonForm]
    perform: Callable[[Visit, Any, dict[str, Any]], None]  # (visit, user, cleaned form data)
    permission: str = REPROCESS_PERMISSION
    refusal: str = "retrying, re-running or cancelling needs the reprocess permission."


def _retry(visit: Visit, user: Any, data: dict[str, Any]) -> None:
    visit_retry(visit=visit, actor=user, reason=data["reason"])


def _run_now(visit: Visit, user: Any, data: dict[str, Any]) -> None:
    visit_skip_backoff(visit=visit, actor=user, reason=data["reason"])


def _rerun(visit: Visit, user: Any, data: dict[str, Any]) -> None:
    visit_rerun_from(visit=visit, stage=data["stage"], actor=user, reason=data["reason"])


def _cancel(visit: Visit, user: Any, data: dict[str, Any]) -> None:
    visit_cancel(visit=visit, actor=user, reason=data["reason"])


def _retry_delivery(visit: Visit, user: Any, data: dict[str, Any]) -> None:
    visit_retry_deliveries(visit=visit, actor=user, reason=data["reason"])


def _purge(visit: Visit, user: Any, data: dict[str, Any]) -> None:
    visit_purge(visit, reason=data["reason"], actor=user)


OPERATIONS: dict[str, Operation] = {
    operation.name: operation
    for operation in (
        Operation("retry_failed_stage", "Retry failed stage", ReasonForm, _retry),
        Operation("run_now", "Run now", ReasonForm, _run_now),
        Operation("rerun_from_stage", "Re-run from stage", RerunForm, _rerun),
        Operation("cancel", "Cancel", ReasonForm, _cancel),
        Operation(
            "retry_delivery", "Retry failed delivery to the EHR", ReasonForm, _retry_delivery
        ),
        # The admin's "delete": the visit's PHI goes, the row, signed note and trail stay.
        Operation(
            "purge_now",
            "Purge now (retention)",
            ReasonForm,
            _purge,
            permission=PURGE_PERMISSION,
            refusal="purging needs the permission to delete visits.",
        ),
    )
}


def _operate(
    modeladmin: VisitAdmin,
    request: HttpRequest,
    queryset: QuerySet[Visit],
    operation: Operation,
    *,
    back_url: str | None = None,
) -> TemplateResponse | None:
    """Ask for a reason (and options) on an intermediate page, then apply to each visit.

    None once applied (the messages say what was done and what was refused); the caller
    redirects."""
    form = operation.form_class(request.POST if "apply" in request.POST else None)
    if not form.is_valid():
        return TemplateResponse(
            request,
            "admin/visits/operate.html",
            {
                **modeladmin.admin_site.each_context(request),
                "title": operation.title,
                "form": form,
                "visits": queryset,
                "action": operation.name,
                "action_checkbox_name": ACTION_CHECKBOX_NAME,
                "opts": modeladmin.model._meta,
                "back_url": back_url or request.get_full_path(),
            },
        )
    done, refused = 0, []
    for visit in queryset.select_related("current_run"):
        try:
            operation.perform(visit, request.user, form.cleaned_data)
            done += 1
        except (PipelineError, PermissionDenied) as exc:
            refused.append(f"visit {visit.pk}: {exc}")
    if done:
        modeladmin.message_user(
            request, f"{operation.title}: done for {done} visit(s).", messages.SUCCESS
        )
    for line in refused:
        modeladmin.message_user(request, line, messages.WARNING)
    return None


# --- the pipeline on a visit's page ----------------------------------------------------------

RUNS_IN_DETAIL = 10
"""How many of a visit's newest runs its page shows stage by stage (two queries each); older
runs are listed with a link to their own admin page. The current run is always in detail."""


@dataclass(frozen=True)
class AttemptRow:
    attempt: Attempt
    duration: str


@dataclass(frozen=True)
class StageRow:
    stage: Stage
    attempts: list[AttemptRow]


@dataclass(frozen=True)
class RunRow:
    run: Run
    link: str
    is_current: bool
    forked_from_link: str
    fork_links: list[str]  # the runs re-run from this one
    stages: list[StageRow] | None  # None: not shown in detail (see RUNS_IN_DETAIL)


def visit_pipeline(visit: Visit, *, runs_in_detail: int = RUNS_IN_DETAIL) -> list[RunRow]:
    """Every run of the visit, newest first; the newest `runs_in_detail` (and the current one)
    with their stages and every attempt. 1 + 2 * min(runs, runs_in_detail + 1) queries."""
    runs = runs_of_subject(visit.subject)
    forks: dict[int, list[str]] = {}
    for run in reversed(runs):  # oldest first, so that each run's forks read in order
        if run.forked_from_id is not None:
            forks.setdefault(run.forked_from_id, []).append(run_admin_link(run.pk))
    rows = []
    for index, run in enumerate(runs):
        is_current = run.pk == visit.current_run_id
        stages = None
        if is_current or index < runs_in_detail:
            stages = [
                StageRow(
                    stage=stage,
                    # Attempts come prefetched by run_stages: no query per stage or attempt.
                    attempts=[
                        AttemptRow(attempt=attempt, duration=attempt_duration(None, attempt))
                        for attempt in stage.attempts.all()
                    ],
                )
                for stage in run_stages(run.pk)
            ]
        rows.append(
            RunRow(
                run=run,
                link=run_admin_link(run.pk),
                is_current=is_current,
                forked_from_link=run_admin_link(run.forked_from_id),
                fork_links=forks.get(run.pk, []),
                stages=stages,
            )
        )
    return rows


@admin.register(Visit)
class VisitAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "clinician",
        "label",
        "created_at",
        "status",
        "failed_stage",
        "failure",
        "error_code",
        "run_link",
    ]
    list_filter = [
        VisitStateFilter,
        "current_run__status",
        FailedStageFilter,
        FailureKindFilter,
        ErrorTypeFilter,
        "clinician",
        "created_at",
    ]
    date_hierarchy = "created_at"
    search_fields = ["=id", "label", "clinician__username"]
    list_select_related = ["clinician", "current_run"]
    list_per_page = 100
    actions = [
        "retry_failed_stage",
        "run_now",
        "rerun_from_stage",
        "cancel",
        "retry_delivery",
        "purge_now",
    ]
    readonly_fields = [
        "clinician",
        "recording_name",
        "recording_bytes",
        "created_at",
        "current_run",
        "purged_at",
    ]
    fields = ["label", *readonly_fields]
    # The fields, then the pipeline: every run, its stages and attempts, and the operations.
    change_form_template = "admin/visits/visit/change_form.html"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Visit]:
        return with_failed_stage(super().get_queryset(request), via="current_run")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # visits come from uploads and `process_recording`, with their recording

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # A delete would cascade, or be refused by what protects the visit, and leave its
        # files behind: "Purge now (retention)" is how a visit is deleted here.
        return False

    def has_reprocess_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(REPROCESS_PERMISSION)

    def has_purge_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(PURGE_PERMISSION)

    def get_urls(self) -> list[URLPattern]:
        operate = self.admin_site.admin_view(self.operate_view)  # staff only, CSRF-protected
        return [
            path(
                "<int:object_id>/operate/<slug:action>/",
                operate,
                name="visits_visit_operate",
            ),
            *super().get_urls(),
        ]

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: Visit | None = None,
    ) -> HttpResponse:
        if obj is not None and obj.pk is not None:
            if request.method == "GET":
                # The page shows the pipeline's outputs (transcript, note): a look at PHI.
                audit_record(Action.VIEW_ADMIN, user=request.user, visit=obj)
            context["pipeline_runs"] = visit_pipeline(obj)
            context["operations"] = [
                (operation.title, reverse("admin:visits_visit_operate", args=[obj.pk, name]))
                for name, operation in OPERATIONS.items()
                if request.user.has_perm(operation.permission)
            ]
        return super().render_change_form(request, context, add, change, form_url, obj)

    def operate_view(self, request: HttpRequest, object_id: int, action: str) -> HttpResponse:
        """One operation on one visit, from the buttons on its page: the reason form (the same
        intermediate page as the list's actions), then the operation, then back to the page."""
        operation = OPERATIONS.get(action)
        if operation is None:
            raise Http404(f"No operation “{action}”.")
        visit = self.get_object(request, str(object_id))
        if visit is None:
            self.message_user(request, f"There is no visit {object_id}.", messages.WARNING)
            return HttpResponseRedirect(reverse("admin:visits_visit_changelist"))
        if not self.has_view_or_change_permission(request, visit):
            raise PermissionDenied
        change_url = reverse("admin:visits_visit_change", args=[visit.pk])
        if not request.user.has_perm(operation.permission):
            self.message_user(
                request, f"{operation.title}: refused; {operation.refusal}", messages.WARNING
            )
            return HttpResponseRedirect(change_url)
        queryset = self.get_queryset(request).filter(pk=visit.pk)
        response = _operate(self, request, queryset, operation, back_url=change_url)
        return response if response is not None else HttpResponseRedirect(change_url)

    @admin.display(description="status", ordering="current_run__status")
    def status(self, visit: Visit) -> str:
        return visit.current_run.status if visit.current_run else "—"

    @admin.display(description="failed at", ordering="failed_stage_name")
    def failed_stage(self, visit: Any) -> str:
        return visit.failed_stage_name or ""

    @admin.display(description="how", ordering="failed_kind")
    def failure(self, visit: Any) -> str:
        return FailureKind(visit.failed_kind).label if visit.failed_kind else ""

    @admin.display(description="error", ordering="failed_error_code")
    def error_code(self, visit: Any) -> str:
        return visit.failed_error_code or ""

    @admin.display(description="run")
    def run_link(self, visit: Visit) -> str:
        return run_admin_link(visit.current_run_id)

    @admin.action(description="Retry failed stage", permissions=["reprocess"])
    def retry_failed_stage(self, request: HttpRequest, queryset: QuerySet[Visit]) -> Any:
        return _operate(self, request, queryset, OPERATIONS["retry_failed_stage"])

    @admin.action(description="Run now (skip the remaining backoff)", permissions=["reprocess"])
    def run_now(self, request: HttpRequest, queryset: QuerySet[Visit]) -> Any:
        return _operate(self, request, queryset, OPERATIONS["run_now"])

    @admin.action(description="Re-run from stage…", permissions=["reprocess"])
    def rerun_from_stage(self, request: HttpRequest, queryset: QuerySet[Visit]) -> Any:
        return _operate(self, request, queryset, OPERATIONS["rerun_from_stage"])

    @admin.action(description="Cancel", permissions=["reprocess"])
    def cancel(self, request: HttpRequest, queryset: QuerySet[Visit]) -> Any:
        return _operate(self, request, queryset, OPERATIONS["cancel"])

    @admin.action(description="Retry failed delivery to the EHR", permissions=["reprocess"])
    def retry_delivery(self, request: HttpRequest, queryset: QuerySet[Visit]) -> Any:
        return _operate(self, request, queryset, OPERATIONS["retry_delivery"])

    @admin.action(description="Purge now (retention)…", permissions=["purge"])
    def purge_now(self, request: HttpRequest, queryset: QuerySet[Visit]) -> Any:
        return _operate(self, request, queryset, OPERATIONS["purge_now"])


@admin.register(ClinicianVocabulary)
class ClinicianVocabularyAdmin(admin.ModelAdmin):
    """Each clinician's specialty and own words: what their visits' transcription expects.
    A change applies to visits created after it (a visit keeps the prompt it started with)."""

    list_display = ["clinician", "specialty", "updated_at"]
    list_filter = ["specialty"]
    search_fields = ["clinician__username"]
    autocomplete_fields = ["clinician"]
    readonly_fields = ["prompt_preview", "updated_at"]

    @admin.display(description="prompt the transcription is given")
    def prompt_preview(self, vocabulary: ClinicianVocabulary) -> str:
        return vocabulary_prompt(vocabulary.specialty, vocabulary.word_list()) or "—"


@admin.register(AccessEvent)
class AccessEventAdmin(admin.ModelAdmin):
    """The audit trail, for a privacy officer (`visits.view_audit`): filter by user, visit,
    action, outcome and date; export what is selected (or every match) as CSV. Nobody can add,
    change or delete a row here (and on PostgreSQL not even in SQL)."""

    # The CSV's columns, less the two that are long or only an id.
    list_display = [c for c in CSV_COLUMNS if c not in ("actor_id", "user_agent")]
    list_filter = ["action", "outcome", "created_at", ("actor", admin.RelatedOnlyFieldListFilter)]
    date_hierarchy = "created_at"
    # "=visit__id": who looked at visit N is a search for N.
    search_fields = ["=visit__id", "actor_label", "os_user", "ip"]
    list_select_related = ["actor"]
    list_per_page = 200
    actions = ["export_csv"]

    def has_module_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(AUDIT_PERMISSION)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm(AUDIT_PERMISSION)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_view_audit_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(AUDIT_PERMISSION)

    @admin.action(description="Export as CSV", permissions=["view_audit"])
    def export_csv(self, request: HttpRequest, queryset: QuerySet[AccessEvent]) -> HttpResponse:
        response = HttpResponse(content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = 'attachment; filename="audit-trail.csv"'
        audit_csv_write(queryset.order_by("created_at", "id"), response)
        return response
