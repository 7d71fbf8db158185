"""Read-only admin for the engine's tables: every change goes through an audited action."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from pipeline.models import Attempt, AuditEntry, LLMCall, Run, Stage
from pipeline.selectors import STAGE_STATES, filter_stage_state

if TYPE_CHECKING:
    # django-stubs makes the admin classes generic in their model; Django's own classes cannot
    # be subscripted at run time, so the parameters exist only for the type checker.
    _ModelAdmin = admin.ModelAdmin[Any]
    _TabularInline = admin.TabularInline[Any, Any]
else:
    _ModelAdmin = admin.ModelAdmin
    _TabularInline = admin.TabularInline


class ReadOnlyAdmin(_ModelAdmin):
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return [field.name for field in self.model._meta.fields]


class ReadOnlyInline(_TabularInline):
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class StageStateFilter(admin.SimpleListFilter):
    """The questions an on-call admin asks of stages. A domain admin whose rows point at a run
    subclasses it with the path to that run's stages as `prefix`."""

    title = "state"
    parameter_name = "state"
    prefix = ""

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return list(STAGE_STATES.items())

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return filter_stage_state(queryset, self.value(), prefix=self.prefix)


def run_admin_link(run_id: int | None) -> str:
    """A link to a run's admin page, for any admin that shows runs."""
    if run_id is None:
        return ""
    url = reverse("admin:pipeline_run_change", args=[run_id])
    return format_html('<a href="{}">run {}</a>', url, run_id)


@admin.display(description="duration")
def attempt_duration(self: Any, attempt: Attempt) -> str:
    if attempt.finished_at is None:
        return "—"
    return f"{(attempt.finished_at - attempt.started_at).total_seconds():.2f} s"


class AttemptInline(ReadOnlyInline):
    model = Attempt
    fields = (
        "number",
        "status",
        "worker",
        "started_at",
        "duration",
        "error_code",
        "error_message",
        "input_tokens",
        "output_tokens",
        "cost_usd",
        "traceback",
    )
    readonly_fields = fields

    duration = attempt_duration


class StageInline(ReadOnlyInline):
    model = Stage
    fields = (
        "name",
        "status",
        "failure_kind",
        "attempt_count",
        "next_attempt_at",
        "error_code",
        "reused_from",
    )
    readonly_fields = fields


@admin.register(Run)
class RunAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "workflow",
        "subject",
        "status",
        "forked_from",
        "fork_stage",
        "created_at",
    ]
    list_filter = ["status", "workflow", ("forked_from", admin.EmptyFieldListFilter), "created_at"]
    search_fields = ["subject"]
    date_hierarchy = "created_at"
    list_select_related = ["forked_from"]
    inlines = [StageInline]


@admin.register(Stage)
class StageAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "run",
        "name",
        "status",
        "failure_kind",
        "attempt_count",
        "next_attempt_at",
        "lease_expires_at",
        "error_code",
    ]
    list_filter = [StageStateFilter, "status", "failure_kind", "name", "error_code"]
    list_select_related = ["run"]
    search_fields = ["run__subject"]
    inlines = [AttemptInline]


@admin.register(Attempt)
class AttemptAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "stage_link",
        "number",
        "status",
        "worker",
        "started_at",
        "duration",
        "error_code",
        "input_tokens",
        "output_tokens",
        "cost_usd",
    ]
    list_filter = ["status", "error_code", "stage__name", "started_at"]
    list_select_related = ["stage"]
    date_hierarchy = "started_at"

    @admin.display(description="stage")
    def stage_link(self, attempt: Attempt) -> str:
        return format_html(
            '<a href="{}">{} of run {}</a>',
            reverse("admin:pipeline_stage_change", args=[attempt.stage_id]),
            attempt.stage.name,
            attempt.stage.run_id,
        )

    duration = attempt_duration


@admin.register(LLMCall)
class LLMCallAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "model",
        "stage",
        "attempt",
        "input_tokens",
        "output_tokens",
        "cost_usd",
        "created_at",
    ]
    list_filter = ["model", "stage__name", "created_at"]
    list_select_related = ["stage", "attempt", "attempt__stage"]


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyAdmin):
    """The audit trail: readable by staff, editable by nobody."""

    list_display = ["created_at", "action", "actor_label", "run", "new_run", "stage", "reason"]
    list_filter = ["action", "created_at"]
    search_fields = ["actor_label", "reason", "run__subject"]
    list_select_related = ["run", "new_run"]
