"""Log lines as JSON objects, one per line (LOG_FORMAT=json, the default when DEBUG is off).

Every line says what it is about: the engine binds the subject, run, stage and attempt while an
attempt runs, and `LogContextMiddleware` binds the view and the visit a request is for, so a
log search for one visit or one attempt finds all of its lines, from the web and the workers
alike. What is bound are ids and names, never anything a visit contains.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from django.http import HttpRequest, HttpResponse


class JsonFormatter(structlog.stdlib.ProcessorFormatter):
    """The stdlib logging formatter (for LOGGING) that writes each record as one JSON object."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
            **kwargs,  # what logging.config passes a formatter (fmt, datefmt, style, ...)
        )


class LogContextMiddleware:
    """Bind the view's name and the visit a request is for to every line it logs."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        # Cleared as each request starts, not as it ends: Django logs a 4xx or 5xx response
        # after the middleware has returned it, and that line should say which visit too.
        structlog.contextvars.clear_contextvars()
        return self.get_response(request)

    def process_view(
        self, request: HttpRequest, view: Callable[..., Any], args: Any, kwargs: dict[str, Any]
    ) -> None:
        match = request.resolver_match
        context: dict[str, Any] = {"view": match.view_name if match else view.__name__}
        if "visit_id" in kwargs:
            context["visit"] = kwargs["visit_id"]
        structlog.contextvars.bind_contextvars(**context)
