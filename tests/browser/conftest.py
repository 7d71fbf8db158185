"""Real-browser tests: Debian's Chromium, driven by Playwright (pytest-playwright), against
pytest-django's live server on PostgreSQL, with a real django-q2 cluster doing the work.

Playwright's browser download cannot work here, so the browser is /usr/bin/chromium
(`apt-get install -y chromium`; `.ci/run` installs it when missing).

Confinement. While Playwright's sync API is started, the main thread has an asyncio loop marked
as running, and Django then refuses ORM calls from that thread (SynchronousOnlyOperation). The
plugin starts Playwright once per session, so any database test collected after the first
browser test would break. Here Playwright and the browser live only as long as this package
(package-scoped overrides of the plugin's session fixtures), and Django's check is relaxed only
in between: the rest of the suite runs exactly as without the plugin."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import (
    Browser,
    BrowserType,
    Page,
    Playwright,
    expect,
    sync_playwright,
)

from tests.support.cluster import Cluster

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    # No internet here: without these Chromium keeps calling Google's services.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="package", autouse=True)
def _orm_beside_playwright() -> Iterator[None]:
    """Allow the ORM in the main thread while Playwright runs (set up before it, torn down after
    it); the test's own database work and pytest-django's flush happen there."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        yield


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    """The plugin's options (--headed, --slowmo), on Debian's Chromium."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium", pytrace=False)
    return {**browser_type_launch_args, "executable_path": str(CHROMIUM), "args": CHROMIUM_ARGS}


@pytest.fixture(scope="package")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as started:
        yield started


@pytest.fixture(scope="package")
def browser_type(playwright: Playwright, browser_name: str) -> BrowserType:
    return getattr(playwright, browser_name)


@pytest.fixture(scope="package")
def launch_browser(
    browser_type_launch_args: dict[str, Any], browser_type: BrowserType
) -> Callable[..., Browser]:
    def launch(**kwargs: Any) -> Browser:
        return browser_type.launch(**{**browser_type_launch_args, **kwargs})

    return launch


@pytest.fixture(scope="package")
def browser(launch_browser: Callable[..., Browser]) -> Iterator[Browser]:
    started = launch_browser()
    yield started
    started.close()


@pytest.fixture(scope="package")
def browser_context_args(live_server) -> dict[str, Any]:
    """Every page talks to the live server: `page.goto("/visits/new/")`."""
    return {"base_url": live_server.url, "viewport": {"width": 1280, "height": 900}}


@pytest.fixture(scope="package", autouse=True)
def _expect_timeout() -> Iterator[None]:
    expect.set_options(timeout=10_000)  # a loaded CI machine: 2 cores shared with the workers
    yield
    expect.set_options(timeout=5_000)


@pytest.fixture
def start_cluster(transactional_db, tmp_path: Path) -> Iterator[Callable[[], Cluster]]:
    """Starts `manage.py qcluster` on the test database when called; killed after the test,
    before the database is flushed."""
    started: list[Cluster] = []

    def start() -> Cluster:
        cluster = Cluster(tmp_path / f"cluster-{len(started)}.log").start()
        started.append(cluster)
        return cluster

    yield start
    for cluster in started:
        cluster.kill()  # a graceful django-q2 shutdown takes ~15 s and proves nothing here


@pytest.fixture
def screenshot(tmp_path: Path) -> Callable[[Page, str], Path]:
    """Save what a page shows (the viewport, as a person sees it). With SCREENSHOTS_DIR set, as
    `make screenshots` does, a copy goes there too: the README's pictures come from these."""

    def take(page: Page, name: str) -> Path:
        path = tmp_path / f"{name}.png"
        page.screenshot(path=path)
        if target := os.environ.get("SCREENSHOTS_DIR"):
            Path(target).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, Path(target) / path.name)
        return path

    return take
