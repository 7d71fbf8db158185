"""How long a signed-in session lasts, and that no page of it is cached.

A session ends after `SESSION_IDLE_MINUTES` without activity (default 15) and in any case
`SESSION_ABSOLUTE_HOURS` after sign-in (default 12), as PHI systems are expected to. A page
that refreshes itself is not activity: views marked `@session_passive` (the live fragments
htmx polls) neither extend the session nor keep it alive, so a visit page left open on a
shared screen still signs its user out. Every response to a signed-in user is sent with
`Cache-Control: private, no-store`, so no PHI page stays in a browser's or a proxy's cache.
Too many wrong passwords pause signing in (django-axes, configured in settings); `locked_out`
is the page that says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import logout
from django.contrib.auth.signals import user_logged_in
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.utils.cache import patch_cache_control
from django_htmx.http import HttpResponseClientRedirect

ViewT = TypeVar("ViewT", bound=Callable[..., Any])

STARTED = "session_started_at"
ACTIVE = "session_active_at"
ACTIVITY_RESOLUTION = 60.0  # seconds


def session_passive(view: ViewT) -> ViewT:
    """Mark a view whose requests are not a person's activity (a page polling itself)."""
    view.session_passive = True  # type: ignore[attr-defined]
    return view


class SessionPolicyMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if getattr(request, "user", None) is not None and request.user.is_authenticated:
            patch_cache_control(response, private=True, no_store=True)
        return response

    def process_view(
        self, request: HttpRequest, view: Callable[..., Any], args: Any, kwargs: Any
    ) -> HttpResponse | None:
        if not request.user.is_authenticated:
            return None
        now = time.time()
        session = request.session
        started = session.get(STARTED, now)
        active = session.get(ACTIVE, started)
        if now - started > settings.SESSION_ABSOLUTE_HOURS * 3600:
            return _signed_out(request, f"after {settings.SESSION_ABSOLUTE_HOURS} hours")
        if now - active > settings.SESSION_IDLE_MINUTES * 60:
            return _signed_out(
                request, f"after {settings.SESSION_IDLE_MINUTES} minutes without activity"
            )
        # Written at most once a minute: a session write per request would cost every page
        # three queries, and minutes are what the idle limit counts.
        if STARTED not in session:  # signed in before this policy was in force
            session[STARTED] = started
        if not getattr(view, "session_passive", False) and now - active > ACTIVITY_RESOLUTION:
            session[ACTIVE] = now
        return None


@receiver(user_logged_in)
def _session_start(sender: Any, request: HttpRequest | None, **kwargs: Any) -> None:
    if request is not None and hasattr(request, "session"):
        request.session[STARTED] = request.session[ACTIVE] = time.time()


def _signed_out(request: HttpRequest, why: str) -> HttpResponse:
    back = request.get_full_path()
    if request.headers.get("HX-Request"):
        # A fragment polled from a page: send the whole page to the sign-in, not the fragment.
        current = urlsplit(request.headers.get("HX-Current-URL", ""))
        back = current.path + (f"?{current.query}" if current.query else "")
        back = back or reverse(settings.LOGIN_REDIRECT_URL)
    request.signed_out_why = why  # type: ignore[attr-defined]  # the audit trail says why
    logout(request)
    messages.info(request, f"You were signed out {why}. Sign in again to go on.")
    target = f"{reverse(settings.LOGIN_URL)}?{urlencode({'next': back})}"
    if request.headers.get("HX-Request"):
        return HttpResponseClientRedirect(target)
    return HttpResponseRedirect(target)


def locked_out(
    request: HttpRequest, credentials: dict[str, Any] | None, *args: Any
) -> HttpResponse:
    """What a locked-out sign-in is told (django-axes' AXES_LOCKOUT_CALLABLE): why, and for
    how long, in minutes rather than axes' own "0:15:00"."""
    context = {
        "failure_limit": settings.AXES_FAILURE_LIMIT,
        "minutes": int(settings.AXES_COOLOFF_TIME.total_seconds() // 60),
    }
    return render(request, "registration/locked_out.html", context, status=429)
