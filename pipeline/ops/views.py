"""The operations dashboard (staff only, reads only), the probes and the metrics."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_safe
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from pipeline.ops import charts
from pipeline.ops.dashboard import DEFAULT_WINDOW_DAYS, MAX_WINDOW_DAYS, Dashboard, dashboard_get
from pipeline.ops.health import readiness
from pipeline.ops.metrics import PipelineCollector

WINDOW_CHOICES = (1, 7, 30, 90)

View = Callable[..., HttpResponse]


def staff_required(view: View) -> View:
    """Anonymous users go to the login page; signed-in users who are not staff get a 403."""

    @wraps(view)
    @login_required
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_staff:
            raise PermissionDenied("The operations dashboard is for staff.")
        return view(request, *args, **kwargs)

    return wrapper


def parse_days(raw: str | None) -> int | None:
    """The window in whole days from `?days=`: the default when absent, None when invalid."""
    if raw is None or raw.strip() == "":
        return DEFAULT_WINDOW_DAYS
    raw = raw.strip()
    if not raw.isdigit() or len(raw) > 4:
        return None
    days = int(raw)
    return days if 1 <= days <= MAX_WINDOW_DAYS else None


@staff_required
def dashboard(request: HttpRequest) -> HttpResponse:
    days = parse_days(request.GET.get("days"))
    if days is None:
        return HttpResponseBadRequest(
            f"days must be a whole number from 1 to {MAX_WINDOW_DAYS}.",
            content_type="text/plain; charset=utf-8",
        )
    board = dashboard_get(days=days)
    return render(
        request,
        "pipeline/dashboard.html",
        {"board": board, "charts": _charts(board), "window_choices": WINDOW_CHOICES},
    )


def _charts(board: Dashboard) -> dict[str, str]:
    days = [row.label[5:] for row in board.spend_by_day]  # "MM-DD"
    stages = [row.label for row in board.stages]
    return {
        "tokens_by_day": charts.bar_chart(
            days,
            [
                charts.Series("input tokens", [r.input_tokens for r in board.spend_by_day]),
                charts.Series("output tokens", [r.output_tokens for r in board.spend_by_day]),
            ],
            title="Tokens per day",
        ),
        "cost_by_day": charts.line_chart(
            days,
            [r.cost_usd for r in board.spend_by_day],
            title="Dollars per day",
            name="USD",
            fmt=charts.dollars,
            height=180,
        ),
        "attempts_by_stage": charts.bar_chart(
            stages,
            [
                charts.Series("succeeded", [r.succeeded for r in board.stages], tone="ok"),
                charts.Series("failed", [r.failed for r in board.stages], tone="bad"),
                charts.Series("lost", [r.lost for r in board.stages], tone="warn"),
            ],
            title="Attempts by stage and outcome",
            height=200,
        ),
    }


@require_safe
def healthz(request: HttpRequest) -> HttpResponse:
    """The process answers (for a liveness probe)."""
    return HttpResponse("ok\n", content_type="text/plain")


@require_safe
def readyz(request: HttpRequest) -> HttpResponse:
    """Database, migrations, broker and a worker cluster (for a readiness probe); 503 if not."""
    ready = readiness()
    return JsonResponse(ready.model_dump(), status=200 if ready.ready else 503)


_registry = CollectorRegistry(auto_describe=False)
_registry.register(PipelineCollector())


@require_safe
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus metrics, for the scraper only: a bearer token (METRICS_TOKEN) or an address
    on METRICS_ALLOWED_IPS. Nothing in them names a visit or what it contains."""
    token = settings.METRICS_TOKEN
    presented = request.headers.get("Authorization", "")
    by_token = bool(token) and hmac.compare_digest(presented, f"Bearer {token}")
    if not by_token and request.META.get("REMOTE_ADDR") not in settings.METRICS_ALLOWED_IPS:
        return HttpResponse(
            "Metrics need METRICS_TOKEN as a bearer token, or an address on METRICS_ALLOWED_IPS.\n",
            status=403,
            content_type="text/plain; charset=utf-8",
        )
    return HttpResponse(generate_latest(_registry), content_type=CONTENT_TYPE_LATEST)
