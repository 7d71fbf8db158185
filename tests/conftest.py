"""Shared fixtures: private storage per test, fast backoffs, users, the loopback LLM server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings

from tests.fakes.fhir_server import FakeFhirServer
from tests.fakes.llm_server import FakeLLMServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIXTURES = Path(settings.BASE_DIR) / "fixtures"
SAMPLE_VISIT = FIXTURES / "visit_sample.ogg"
SHORT_VISIT = FIXTURES / "visit_short.mp3"


def is_postgres() -> bool:
    return settings.DATABASES["default"]["ENGINE"].endswith("postgresql")


requires_postgres = pytest.mark.skipif(
    not is_postgres(), reason="needs PostgreSQL (set DATABASE_URL=postgres://...)"
)


@pytest.fixture(autouse=True)
def private_storage(settings, tmp_path: Path) -> Path:
    root = tmp_path / "private"
    root.mkdir()
    settings.PRIVATE_STORAGE_ROOT = root
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": root, "base_url": None},
        },
    }
    return root


@pytest.fixture(autouse=True)
def fast_retries(settings) -> None:
    settings.PIPELINE_RETRY_INTERVAL_SCALE = 0.01
    settings.OPENAI_API_KEY = ""


@pytest.fixture(autouse=True)
def consent_collected_elsewhere(settings) -> None:
    """Most tests are about something other than consent: their recordings count as consented
    outside the app (a deployment setting). The tests of consent turn this off."""
    settings.CONSENT_COLLECTED_ELSEWHERE = True


@pytest.fixture
def clinician(django_user_model):
    return django_user_model.objects.create_user(username="dr_ada", password="pw-ada-12345!")


@pytest.fixture
def other_clinician(django_user_model):
    return django_user_model.objects.create_user(username="dr_bob", password="pw-bob-12345!")


@pytest.fixture
def llm_server(settings) -> Iterator[FakeLLMServer]:
    """A real HTTP server speaking the chat-completions protocol; the LLM path points at it."""
    with FakeLLMServer(timeout_seconds=3.0) as server:
        settings.OPENAI_API_KEY = "test-key"
        settings.OPENAI_BASE_URL = server.base_url
        settings.LLM_MODEL = "gpt-4o-mini"
        settings.LLM_REQUEST_TIMEOUT_SECONDS = 1.0
        yield server


@pytest.fixture
def fhir_server(settings) -> Iterator[FakeFhirServer]:
    """A real HTTP server playing the EHR's FHIR endpoint; signing delivers to it."""
    with FakeFhirServer(hold_seconds=3.0) as server:
        settings.FHIR_BASE_URL = server.base_url
        settings.FHIR_AUTH_TOKEN = ""
        settings.FHIR_TIMEOUT_SECONDS = 1.0
        yield server
