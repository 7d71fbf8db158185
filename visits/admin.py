"""The on-call view of visits: filters that answer real questions, and audited actions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.utils.html import format_html_join

from pipeline.admin import StageStateFilter, run_admin_link
from pipeline.errors import PipelineError
from pipeline.selectors import (
    failed_error_codes,
    filter_failed_at,
    runs_of_subject,
    with_failed_stage,
)
from pipeline.states import FailureKind
from visits.models import Visit
from visits.services import (
    REPROCESS_PERMISSION,
    visit_cancel,
    visit_rerun_from,
    visit_retry,
    visit_skip_backoff,
)
from visits.stages import VISIT_WORKFLOW


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


def _operate(
    modeladmin: VisitAdmin,
    request: HttpRequest,
    queryset: QuerySet[Visit],
    *,
    title: str,
    form_class: type[ReasonForm],
    perform: Callable[[Visit, dict[str, Any]], None],
) -> TemplateResponse | None:
    """Ask for a reason (and options) on an intermediate page, then apply to each visit."""
    form = form_class(request.POST if "apply" in request.POST else None)
    if not form.is_valid():
        return TemplateResponse(
            request,
            "admin/visits/operate.html",
            {
                **modeladmin.admin_site.each_context(request),
                "title": title,
                "form": form,
                "visits": queryset,
                "action": request.POST["action"],
                "action_checkbox_name": ACTION_CHECKBOX_NAME,
                "opts": modeladmin.model._meta,
            },
        )
    done, refused = 0, []
    for visit in queryset.select_related("current_run"):
        try:
            perform(visit, form.cleaned_data)
            done += 1
        except (PipelineError, PermissionDenied) as exc:
            refused.append(f"visit {visit.pk}: {exc}")
    if done:
        modeladmin.message_user(request, f"{title}: done for {done} visit(s).", messages.SUCCESS)
    for line in refused:
        modeladmin.message_user(request, line, messages.WARNING)
    return None


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
    actions = ["retry_failed_stage", "run_now", "rerun_from_stage", "cancel"]
    readonly_fields = [
        "clinician",
        "recording_name",
        "recording_bytes",
        "created_at",
        "current_run",
        "runs",
    ]
    fields = ["label", *readonly_fields]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Visit]:
        return with_failed_stage(super().get_queryset(request), via="current_run")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # visits come from uploads and `process_recording`, with their recording

    def has_reprocess_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(REPROCESS_PERMISSION)

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

    @admin.display(description="all runs")
    def runs(self, visit: Visit) -> str:
        return format_html_join(
            "",
            "<div>{} · {} · {}{}</div>",
            (
                (
                    run_admin_link(run.pk),
                    run.status,
                    run.created_at,
                    f" · forked from run {run.forked_from_id}" if run.forked_from_id else "",
                )
                for run in runs_of_subject(visit.subject)
            ),
        )

    @admin.action(description="Retry failed stage", permissions=["reprocess"])
    def retry_failed_stage(self, request: HttpRequest, queryset: QuerySet[Visit]) -> Any:
        return _operate(
            self,
            request,
            queryset,
            title="Retry failed stage",
            form_class=ReasonForm,
            perform=lambda visit, data: visit_retry(
                visit=visit, actor=request.user, reason=data["reason"]
            ),
        )

    @admin.action(description="Run now (skip the remaining backoff)", permissions=["reprocess"])
    def run_now(self, request: HttpRequest, queryset: QuerySet[Visit]) -> Any:
        return _operate(
            self,
            request,
            queryset,
            title="Run now",
            form_class=ReasonForm,
            perform=lambda visit, data: visit_skip_backoff(
                visit=visit, actor=request.user, reason=data["reason"]
            ),
        )

    @admin.action(description="Re-run from stage…", permissions=["reprocess"])
    def rerun_from_stage(self, request: HttpRequest, queryset: QuerySet[Visit]) -> Any:
        return _operate(
            self,
            request,
            queryset,
            title="Re-run from stage",
            form_class=RerunForm,
            perform=lambda visit, data: visit_rerun_from(
                visit=visit, stage=data["stage"], actor=request.user, reason=data["reason"]
            ),
        )

    @admin.action(description="Cancel", permissions=["reprocess"])
    def cancel(self, request: HttpRequest, queryset: QuerySet[Visit]) -> Any:
        return _operate(
            self,
            request,
            queryset,
            title="Cancel",
            form_class=ReasonForm,
            perform=lambda visit, data: visit_cancel(
                visit=visit, actor=request.user, reason=data["reason"]
            ),
        )
