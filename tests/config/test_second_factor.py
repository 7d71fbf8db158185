"""Staff need a one-time code as well as a password (when REQUIRE_STAFF_MFA is on): they enrol
an authenticator once, and every staff session gives a code before it reaches anything."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse
from django_otp.oath import TOTP
from django_otp.plugins.otp_totp.models import TOTPDevice

from visits.models import AccessEvent

pytestmark = pytest.mark.django_db

CODE_PAGE = reverse("second_factor")


@pytest.fixture(autouse=True)
def required(settings) -> None:
    settings.REQUIRE_STAFF_MFA = True


@pytest.fixture
def oncall(django_user_model):
    user = django_user_model.objects.create_user(username="oncall", password="x", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_visit", "reprocess_visit"])
    )
    return user


def code_now(device: TOTPDevice) -> str:
    totp = TOTP(device.bin_key, device.step, device.t0, device.digits, device.drift)
    return f"{totp.token():06d}"


def test_a_staff_session_reaches_nothing_before_its_code(client, oncall):
    client.force_login(oncall)

    for url in ("/admin/", "/ops/dashboard/", reverse("visits:list")):
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"] == f"{CODE_PAGE}?next={url.replace('/', '%2F')}", url
    polled = client.get(reverse("visits:list_rows"), headers={"HX-Request": "true"})
    assert polled["HX-Redirect"].startswith(CODE_PAGE)
    # Signing out is always possible.
    assert client.post(reverse("logout")).status_code == 302


def test_a_clinician_without_staff_rights_needs_no_code(client, clinician):
    client.force_login(clinician)
    assert client.get(reverse("visits:list")).status_code == 200


def test_enrolling_then_giving_a_code_opens_the_admin(client, oncall):
    client.force_login(oncall)

    page = client.get(CODE_PAGE, {"next": "/admin/"})
    assert page.status_code == 200
    text = page.content.decode()
    assert "Set up your authenticator" in text and "data:image/svg+xml" in text
    device = TOTPDevice.objects.get(user=oncall)
    assert not device.confirmed

    wrong = client.post(CODE_PAGE, {"code": "000000" if code_now(device) != "000000" else "1"})
    assert wrong.status_code == 400
    assert "not right" in wrong.content.decode()
    assert client.get("/admin/").status_code == 302
    refused = AccessEvent.objects.get(action=AccessEvent.Action.LOGIN_FAILED)
    assert (refused.actor, refused.detail) == (oncall, "wrong one-time code")

    device.refresh_from_db()
    device.throttling_failure_count = 0  # the wrong code above slowed the next try down
    device.throttling_failure_timestamp = None
    device.save()
    right = client.post(CODE_PAGE, {"code": code_now(device), "next": "/admin/"})

    assert right.status_code == 302 and right["Location"] == "/admin/"
    device.refresh_from_db()
    assert device.confirmed
    assert client.get("/admin/").status_code == 200


def test_a_later_session_gives_the_code_of_its_enrolled_authenticator(oncall):
    device = TOTPDevice.objects.create(user=oncall, name="phone", confirmed=True)
    client = Client()
    client.force_login(oncall)

    page = client.get(CODE_PAGE)
    assert "Enter your code" in page.content.decode()
    assert "data:image/svg+xml" not in page.content.decode()  # the key is never shown again
    response = client.post(CODE_PAGE, {"code": code_now(device), "next": "https://evil.test/"})

    assert response["Location"] == reverse("visits:list")  # never to another site
    assert client.get("/ops/dashboard/").status_code == 200
    assert TOTPDevice.objects.filter(user=oncall).count() == 1


def test_without_the_requirement_staff_sign_in_with_a_password(client, oncall, settings):
    settings.REQUIRE_STAFF_MFA = False
    client.force_login(oncall)
    assert client.get("/ops/dashboard/").status_code == 200


def test_the_requirement_is_on_by_default_in_production():
    env = {k: v for k, v in os.environ.items() if k not in ("DJANGO_DEBUG", "REQUIRE_STAFF_MFA")}
    env |= {"DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": "x" * 60, "DJANGO_ALLOWED_HOSTS": "h"}
    shown = subprocess.run(
        [sys.executable, "-c", "from django.conf import settings as s; import django; "
         "django.setup(); print(s.REQUIRE_STAFF_MFA)"],
        env=env | {"DJANGO_SETTINGS_MODULE": "config.settings"},
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    assert shown.stdout.strip().splitlines()[-1] == "True"
