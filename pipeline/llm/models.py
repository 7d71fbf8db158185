"""The tables that govern model calls: model policies and prices, published, never edited."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q


class Published(models.Model):
    """A governance row that is published, never edited: who published it, when and why."""

    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_by_label = models.CharField(max_length=150)
    reason = models.CharField(max_length=300)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        abstract = True


class ModelPolicy(Published):
    """Which models a stage may ask, and which it asks unless its run names another.

    One row per version: the newest row of a (workflow, stage) is in force, and a stage with no
    row asks `LLM_MODEL`. Rows are never changed or deleted: a change is a new version, saying
    who made it and why, so the history of what each stage was allowed is the table itself."""

    workflow = models.CharField(max_length=64)
    stage = models.CharField(max_length=64)
    version = models.PositiveIntegerField()
    allowed_models = models.JSONField()  # a list of model names, each in the price table
    default_model = models.CharField(max_length=128)

    class Meta:
        ordering = ["workflow", "stage", "-version"]
        verbose_name_plural = "model policies"
        constraints = [
            models.UniqueConstraint(
                fields=["workflow", "stage", "version"], name="pipeline_model_policy_version"
            ),
            models.CheckConstraint(condition=~Q(reason=""), name="pipeline_model_policy_reason"),
        ]

    def __str__(self) -> str:
        return f"{self.workflow}.{self.stage} v{self.version}: {', '.join(self.allowed_models)}"


class ModelPrice(Published):
    """A price row published in the admin, beside the reviewed file `LLM_PRICE_TABLE`.

    Rows are never changed or deleted: a new price is a new row from its effective date, and a
    correction of a row is a newer row for the same date, which wins. Each says who and why."""

    model = models.CharField(max_length=128)
    effective_from = models.DateField()
    input_usd_per_million = models.DecimalField(max_digits=12, decimal_places=6)
    output_usd_per_million = models.DecimalField(max_digits=12, decimal_places=6)

    class Meta:
        ordering = ["model", "-effective_from", "-created_at"]
        constraints = [
            models.CheckConstraint(condition=~Q(reason=""), name="pipeline_model_price_reason"),
            models.CheckConstraint(
                condition=Q(input_usd_per_million__gte=0, output_usd_per_million__gte=0),
                name="pipeline_model_price_not_negative",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.model} from {self.effective_from}"
