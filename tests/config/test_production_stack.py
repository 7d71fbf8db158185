"""`make prod` really runs: gunicorn, whitenoise, both clusters and the sweep under honcho,
with DEBUG off and Redis as the broker. The test waits for /readyz, signs in and uploads a
visit through the web form as a browser would, sees the pipeline finish (transcription on its
own queue), fetches a static file, and stops the stack with SIGTERM."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2 as httpx
import pytest
from django.conf import settings

from pipeline.core.states import RunStatus
from tests.conftest import SHORT_VISIT, requires_postgres
from tests.pipeline.test_redis_broker import REDIS_DB, REDIS_HOST, REDIS_PORT, redis_reachable
from tests.support.cluster import cluster_environment, wait_for
from visits.models import Visit

pytestmark = [
    requires_postgres,
    pytest.mark.cluster,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not redis_reachable(), reason="needs Redis on 127.0.0.1:6379"),
]

PASSWORD = "pw-ada-12345!"  # the `clinician` fixture's


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[str]:
    """`make prod` in its own process group; yields its base URL."""
    port = free_port()
    site = f"visit-pipeline-smoke-{uuid.uuid4().hex[:8]}"
    env = cluster_environment(
        DJANGO_DEBUG="0",
        DJANGO_SECRET_KEY="smoke-" + "x" * 50,
        DJANGO_ALLOWED_HOSTS="127.0.0.1",
        # Plain HTTP on loopback; the proxy that terminates TLS in production says "https".
        DJANGO_SECURE_SSL_REDIRECT="0",
        Q_BROKER="redis",
        REDIS_URL=f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}",
        Q_SITE_NAME=site,
        TRANSCRIBE_QUEUE=f"{site}-transcribe",
        STATIC_ROOT=str(tmp_path / "static"),
        HOST="127.0.0.1",
        PORT=str(port),
        WEB_CONCURRENCY="2",
        PIPELINE_SWEEP_SECONDS="2",
    )
    log = (tmp_path / "prod.log").open("wb")
    process = subprocess.Popen(
        ["make", "--no-print-directory", "prod"],
        cwd=settings.BASE_DIR,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
            raise AssertionError(
                f"the stack did not stop on SIGTERM:\n{(tmp_path / 'prod.log').read_text()}"
            ) from None


class Browser:
    """Just enough of a browser behind a TLS-terminating proxy: the proxy's header says https,
    so the app sets Secure cookies, which this client sends back as a browser on https would."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.cookies: dict[str, str] = {}
        self.client = httpx.Client(base_url=base, timeout=30, follow_redirects=False)

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        headers = {
            "X-Forwarded-Proto": "https",
            "Origin": self.base.replace("http://", "https://"),
            "Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items()),
        }
        response = self.client.request(method, path, headers=headers, **kwargs)
        self.cookies.update(response.cookies)
        return response

    def csrf_token(self, path: str) -> str:
        page = self.request("GET", path)
        assert page.status_code == 200, (path, page.status_code)
        found = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        assert found, path
        return found.group(1)


def test_make_prod_serves_the_app_and_processes_a_visit_uploaded_through_the_web(
    stack, clinician, tmp_path
):
    browser = Browser(stack)
    log_path = tmp_path / "prod.log"

    def waited(condition: Callable[[], object], *, timeout: float, what: str) -> None:
        try:
            wait_for(condition, timeout=timeout, what=what)
        except AssertionError as exc:
            tail = log_path.read_text()[-6000:]
            raise AssertionError(f"{exc}\n--- make prod, last lines ---\n{tail}") from None

    waited(lambda: _ready(browser), timeout=120, what="/readyz to answer 200")

    token = browser.csrf_token("/accounts/login/")
    signed_in = browser.request(
        "POST",
        "/accounts/login/",
        data={"username": clinician.username, "password": PASSWORD, "csrfmiddlewaretoken": token},
    )
    assert signed_in.status_code == 302, signed_in.text
    token = browser.csrf_token("/visits/new/")
    with SHORT_VISIT.open("rb") as recording:
        uploaded = browser.request(
            "POST",
            "/visits/new/",
            # As a clinician gives it on the form: the production stack asks for consent.
            data={"label": "smoke", "consent_method": "verbal", "csrfmiddlewaretoken": token},
            files={"recording": (SHORT_VISIT.name, recording, "audio/mpeg")},
        )
    assert uploaded.status_code == 302, uploaded.text
    visit = Visit.objects.get(label="smoke")
    assert uploaded.headers["location"] == f"/visits/{visit.pk}/"

    def finished() -> bool:
        visit.refresh_from_db()
        run = visit.current_run
        return run is not None and run.status in (RunStatus.SUCCEEDED, RunStatus.FAILED)

    wait_for(
        finished, timeout=180, what=f"the visit to finish\n{(tmp_path / 'prod.log').read_text()}"
    )
    assert visit.current_run.status == RunStatus.SUCCEEDED
    page = browser.request("GET", f"/visits/{visit.pk}/")
    assert page.status_code == 200 and "SOAP note" in page.text
    # Transcription ran on the transcription cluster, the LLM stages on the default one
    # (honcho prefixes each process's lines with its name).
    log = log_path.read_text()
    run = visit.current_run_id
    assert re.search(rf"transcriber\.1 +\|.*run {run} stage transcribe attempt 1 succeeded", log)
    assert re.search(rf"worker\.1 +\|.*run {run} stage summarize attempt 1 succeeded", log)

    # Static files come from whitenoise under their content hash, cacheable for ever.
    stylesheet = re.search(r'href="(/static/css/app\.[0-9a-f]{12}\.css)"', page.text)
    assert stylesheet, "the page links the hashed stylesheet"
    css = browser.request("GET", stylesheet.group(1))
    assert css.status_code == 200 and "max-age=315360000" in css.headers["cache-control"]


def _ready(browser: Browser) -> bool:
    try:
        return browser.request("GET", "/readyz").status_code == 200
    except httpx.TransportError:
        time.sleep(0.5)
        return False
