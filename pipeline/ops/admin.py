"""Read-only admin for the engine's tables: every change goes through an audited action.

What a domain hands the engine and gets back (stage outputs, model answers, checkpoints, error
messages, tracebacks) may be PHI: each admin names those columns in `phi_fields`, and only
people with `pipeline.view_phi` see them or search them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache, reduce
from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from pipeline.core.dispatch import backend
from pipeline.core.errors import PipelineError
from pipeline.core.models import Attempt, AuditEntry, LLMCall, Run, Stage
from pipeline.core.selectors import STAGE_STATES, filter_stage_state
from pipeline.core.signals import phi_viewed
from pipeline.llm.models import ModelPolicy, ModelPrice
from pipeline.llm.policies import policy_check, policy_publish
from pipeline.llm.prices import price_check, price_for, price_publish

if TYPE_CHECKING:
    # django-stubs makes the admin classes generic in their model; Django's own classes cannot
    # be subscripted at run time, so the parameters exist only for the type checker.
    _ModelAdmin = admin.ModelAdmin[Any]
    _TabularInline = admin.TabularInline[Any, Any]
    _ModelForm = forms.ModelForm[Any]
else:
    _ModelAdmin = admin.ModelAdmin
    _TabularInline = admin.TabularInline
    _ModelForm = forms.ModelForm


VIEW_PHI_PERMISSION = "pipeline.view_phi"
PHI_HIDDEN = "hidden: needs the view_phi permission"


def can_view_phi(request: HttpRequest) -> bool:
    return request.user.has_perm(VIEW_PHI_PERMISSION)


@cache
def _phi_hidden(name: str) -> Callable[[Any], str]:
    """The column that stands in for PHI column `name`. One per name: a page's fields and its
    read-only fields must name the same one."""

    @admin.display(description=name.replace("_", " "))
    def hidden(obj: Any) -> str:
        return PHI_HIDDEN

    return hidden


class PHIGate:
    """`phi_fields` are shown, and `phi_search_fields` searched, only with the permission;
    without it a PHI column reads `PHI_HIDDEN` and a search never looks at PHI."""

    phi_fields: tuple[str, ...] = ()
    phi_search_fields: tuple[str, ...] = ()

    def phi_gated(self, request: HttpRequest, names: Sequence[Any]) -> list[Any]:
        if can_view_phi(request):
            return list(names)
        return [_phi_hidden(name) if name in self.phi_fields else name for name in names]


class ReadOnlyAdmin(PHIGate, _ModelAdmin):
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[Any]:
        return self.phi_gated(request, [field.name for field in self.model._meta.fields])

    def get_fields(self, request: HttpRequest, obj: Any = None) -> list[Any]:
        # Every field is read-only; listing them here keeps a hidden one out of the form too.
        return self.get_readonly_fields(request, obj)

    def get_list_display(self, request: HttpRequest) -> list[Any]:
        return self.phi_gated(request, super().get_list_display(request))

    def get_search_fields(self, request: HttpRequest) -> list[str]:
        phi = self.phi_search_fields if can_view_phi(request) else ()
        return [*super().get_search_fields(request), *phi]

    # The attributes from a row to its run's subject, for `phi_viewed`; empty: no PHI here.
    subject_path: tuple[str, ...] = ()

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: Any = None,
    ) -> HttpResponse:
        if obj is not None and self.subject_path and self.phi_fields and can_view_phi(request):
            subject = reduce(getattr, self.subject_path, obj)
            what = f"engine admin: {self.model._meta.verbose_name} {obj.pk}"
            phi_viewed.send(type(self), request=request, subject=subject, what=what)
        return super().render_change_form(request, context, add, change, form_url, obj)


class ReadOnlyInline(PHIGate, _TabularInline):
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_fields(self, request: HttpRequest, obj: Any = None) -> list[Any]:
        return self.phi_gated(request, super().get_fields(request, obj))

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[Any]:
        return self.phi_gated(request, super().get_readonly_fields(request, obj))


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
    phi_fields = ("error_message", "traceback")

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
    phi_fields = phi_search_fields = ("error",)
    subject_path = ("subject",)
    date_hierarchy = "created_at"
    list_select_related = ["forked_from"]
    inlines = [StageInline]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[Any]:
        return [*super().get_readonly_fields(request, obj), "temporal_workflow"]

    @admin.display(description="Temporal workflow")
    def temporal_workflow(self, run: Run) -> str:
        """Where the run's workflow is seen in Temporal's UI (with TEMPORAL_UI_URL set)."""
        link = backend().run_link(run.pk)
        if link is None:
            return "— (built-in backend)"
        if not link.url:
            return link.label
        return format_html('<a href="{}">{}</a>', link.url, link.label)


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
    phi_fields = ("output", "error_message")
    phi_search_fields = ("error_message",)
    subject_path = ("run", "subject")
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
    search_fields = ["stage__run__subject"]
    phi_fields = phi_search_fields = AttemptInline.phi_fields
    subject_path = ("stage", "run", "subject")

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
    search_fields = ["stage__run__subject"]
    # Answers are not searched, even with the permission: a scan of every answer ever given.
    phi_fields = ("content",)
    subject_path = ("stage", "run", "subject")


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyAdmin):
    """The audit trail: readable by staff, editable by nobody."""

    list_display = ["created_at", "action", "actor_label", "run", "new_run", "stage", "reason"]
    list_filter = ["action", "created_at"]
    search_fields = ["actor_label", "reason", "run__subject"]
    list_select_related = ["run", "new_run"]


class PublishOnlyAdmin(_ModelAdmin):
    """For rows that are published, never edited or deleted: "Add" calls the publishing
    service from `save_form`, which saves the row (once) and returns it."""

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        """Already saved by `save_form`."""

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        """A published row has no related rows to save."""


class PublishForm(_ModelForm):
    """A form for a published row: once its fields are valid, the publishing service's own
    check (`publish_check`) has the last word, and its refusal is shown on the form."""

    def publish_check(self, data: dict[str, Any]) -> None:
        raise NotImplementedError

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if self.errors:
            return data
        try:
            self.publish_check(data)
        except PipelineError as exc:
            raise forms.ValidationError(str(exc)) from exc
        return data


class ModelPolicyForm(PublishForm):
    allowed = forms.CharField(
        label="Allowed models",
        help_text="Comma-separated; each must have a row in the price table.",
    )

    class Meta:
        model = ModelPolicy
        fields = ["workflow", "stage", "allowed", "default_model", "reason"]

    def publish_check(self, data: dict[str, Any]) -> None:
        data["allowed_models"] = policy_check(
            workflow=data["workflow"],
            stage=data["stage"],
            allowed=data["allowed"].split(","),
            default=data["default_model"],
            reason=data["reason"],
            on=timezone.now().date(),
        )


@admin.register(ModelPolicy)
class ModelPolicyAdmin(PublishOnlyAdmin):
    """Which models each stage may ask. "Add" publishes a new version; the versions before it
    stay as the policy's history (who, when, why). Nothing is edited or deleted."""

    form = ModelPolicyForm
    list_display = [
        "workflow",
        "stage",
        "version",
        "allowed",
        "default_model",
        "prices",
        "created_by_label",
        "created_at",
        "reason",
    ]
    list_filter = ["workflow", "stage"]
    readonly_fields = ["version", "prices", "created_by_label", "created_at"]

    @admin.display(description="allowed models")
    def allowed(self, policy: ModelPolicy) -> str:
        return ", ".join(policy.allowed_models)

    @admin.display(description="price rows in force (USD per million tokens in / out)")
    def prices(self, policy: ModelPolicy) -> str:
        today = timezone.now().date()
        rows = []
        for model in policy.allowed_models or []:
            price = price_for(model, today)
            rows.append(
                f"{model}: {price.input_usd_per_million} / {price.output_usd_per_million} "
                f"(from {price.effective_from}, {price.source})"
                if price
                else f"{model}: no price"
            )
        return "; ".join(rows) or "—"

    def save_form(self, request: HttpRequest, form: Any, change: bool) -> ModelPolicy:
        # Published here, as a new version, by the one service that decides versions.
        data = form.cleaned_data
        return policy_publish(
            workflow=data["workflow"],
            stage=data["stage"],
            allowed=data["allowed_models"],
            default=data["default_model"],
            reason=data["reason"],
            user=request.user,
            on=timezone.now().date(),
        )


class ModelPriceForm(PublishForm):
    class Meta:
        model = ModelPrice
        fields = [
            "model",
            "effective_from",
            "input_usd_per_million",
            "output_usd_per_million",
            "reason",
        ]
        help_texts = {
            "model": "A model name, or a family (“gpt-4o” prices its dated snapshots too).",
            "effective_from": "Calls from this date on are priced at this row.",
            "reason": "Why the price changed: the provider's notice, a contract, a correction.",
        }

    def publish_check(self, data: dict[str, Any]) -> None:
        price_check(
            model=data["model"],
            input_usd_per_million=data["input_usd_per_million"],
            output_usd_per_million=data["output_usd_per_million"],
            reason=data["reason"],
        )


@admin.register(ModelPrice)
class ModelPriceAdmin(PublishOnlyAdmin):
    """Price rows published between releases, over the file `LLM_PRICE_TABLE`. "Add" publishes
    a row; a correction is a newer row for the same model and date. Nothing is edited or
    deleted, so what a call was priced at can always be explained."""

    form = ModelPriceForm
    list_display = [
        "model",
        "effective_from",
        "input_usd_per_million",
        "output_usd_per_million",
        "created_by_label",
        "created_at",
        "reason",
    ]
    list_filter = ["model"]
    readonly_fields = ["created_by_label", "created_at"]

    def save_form(self, request: HttpRequest, form: Any, change: bool) -> ModelPrice:
        # Published by the one service that decides price rows, as `clean` checked it.
        data = form.cleaned_data
        return price_publish(
            model=data["model"],
            effective_from=data["effective_from"],
            input_usd_per_million=data["input_usd_per_million"],
            output_usd_per_million=data["output_usd_per_million"],
            reason=data["reason"],
            user=request.user,
        )
