"""A second factor for staff: a one-time code from an authenticator app (TOTP, django-otp).

Staff can read every visit or change the pipeline, so when `REQUIRE_STAFF_MFA` is on (the
default when DEBUG is off) a staff session reaches nothing but this page, sign-out and static
files until it has given a code: a password alone is not enough. A staff member without an
authenticator enrols here first (scan the QR code, or type the key), confirming with a code.
Clinicians without staff rights sign in with their password as before.

A wrong code is a failed sign-in in the audit trail; django-otp slows repeated wrong codes
down (each failure doubles the wait), so six digits cannot be guessed in a session.
"""

from __future__ import annotations

from base64 import b32encode
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import segno
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_http_methods
from django_htmx.http import HttpResponseClientRedirect
from django_otp import login as otp_login
from django_otp.plugins.otp_totp.models import TOTPDevice

from visits.privacy.audit import Action, audit_record


def second_factor_needed(request: HttpRequest) -> bool:
    """A staff session that has not yet given its code, where codes are required."""
    user: Any = request.user  # django-otp's middleware gives it `is_verified`
    return bool(
        settings.REQUIRE_STAFF_MFA
        and user.is_authenticated
        and user.is_staff
        and not user.is_verified()
    )


class SecondFactorMiddleware:
    """Send a staff session without its code to the code page, whatever it asked for."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        self.open_paths = (
            reverse("second_factor"),
            reverse("logout"),
            settings.STATIC_URL,
        )

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if not second_factor_needed(request) or request.path.startswith(self.open_paths):
            return self.get_response(request)
        target = f"{reverse('second_factor')}?{urlencode({'next': request.get_full_path()})}"
        if request.headers.get("HX-Request"):
            return HttpResponseClientRedirect(target)
        return HttpResponseRedirect(target)


@login_required
@require_http_methods(["GET", "POST"])
def second_factor(request: HttpRequest) -> HttpResponse:
    """Ask for the code (enrolling an authenticator first if there is none), then go on."""
    user: Any = request.user
    forward = request.POST.get("next") or request.GET.get("next") or ""
    if not url_has_allowed_host_and_scheme(forward, {request.get_host()}):
        forward = ""
    forward = forward or reverse(settings.LOGIN_REDIRECT_URL)
    if user.is_verified():
        return redirect(forward)
    device = TOTPDevice.objects.filter(user=user, confirmed=True).first()
    enrolling = device is None
    if device is None:
        device, _ = TOTPDevice.objects.get_or_create(
            user=user, confirmed=False, defaults={"name": "authenticator app"}
        )
    error = ""
    if request.method == "POST":
        code = "".join(request.POST.get("code", "").split())
        if code.isdigit() and device.verify_token(code):
            if enrolling:
                device.confirmed = True
                device.save(update_fields=["confirmed"])
            otp_login(request, device)
            return redirect(forward)
        error = "That code is not right, or it has expired. Enter the code your app shows now."
        audit_record(Action.LOGIN_FAILED, user=user, refused="wrong one-time code")
    context = {"enrolling": enrolling, "error": error, "next": forward}
    if enrolling:
        context |= {
            "key": _grouped(device.key),
            "qr": segno.make(device.config_url, error="m").svg_data_uri(scale=5),
        }
    return render(request, "registration/second_factor.html", context, status=400 if error else 200)


def _grouped(hex_key: str) -> str:
    """The key as an authenticator app asks for it when typed: base32, in groups of four."""
    plain = b32encode(bytes.fromhex(hex_key)).decode().rstrip("=")
    return " ".join(plain[i : i + 4] for i in range(0, len(plain), 4))
