"""10. The live visit: Stop -> note committed while the recording is transcribed as it is made,
against today's upload path (the whole file in, then transcribed) on the same cluster.

Recordings: for each length (`--minutes`, default 10, 30 and 60), the six evaluation visits
(fixtures/eval) and fixtures/visit_sample.ogg (645 s of distinct speech in all), decoded to
16 kHz and joined over and over until the length is reached, then cut to it (50 ms fade) and
encoded as one Ogg/Opus file (24 kbit/s, `fan_out._ogg_write`, as the fixtures). Each pass
shuffles the seven clips, scales each by a gain drawn from 0.75-1.0 and separates them by
0.6-2.4 s of silence (numpy RNG seeded with the length), so no two 20 s chunks are alike and
the chunk cuts fall at other words on every pass. (`make_long_recording` tiles one sample
exactly; fan_out joins each clip once. Nothing in the product caches a transcription across
visits anyway: a chunk's checkpoint is unique per (stage, key), so every visit hears all of
its audio; the shuffle keeps the transcription itself honest, not a cache.)

* live: the file's bytes are cut into N = ceil(duration / 3) nearly equal pieces, as
  MediaRecorder's 3 s timeslices are consecutive byte ranges of one stream. With Django's
  test `Client` in this process (a bench clinician, force_login; the web server is not what
  is measured): POST /recordings/<uuid>/start/ (mime audio/ogg;codecs=opus; consent collected
  elsewhere), then piece i POSTed at start + (i + 1) x 3 s / pace of wall time (`--pace`: 1 =
  real time), then POST /recordings/<uuid>/finish/ with pieces=N at once after the last
  piece (Stop). **Stop -> note** = the run's finished_at (the note committed) minus the moment
  just before the finish POST. **Lag**: once a second from the first piece to Stop, another
  thread (its own Client and connection) GETs /visits/<id>/transcript/live/; lag = the audio
  in the pieces sent so far (seconds up to the last whole Ogg page in them, from the pages'
  granule positions) minus the transcript's heard_seconds; p50 / p95 in seconds of audio and
  in chunk lengths (TRANSCRIBE_LIVE_CHUNK_SECONDS). Whether the workers keep up at the pace:
  the transcribe stage's units waiting unclaimed (sampled with the lag) and the lag's growth
  (median of the last third of the samples minus that of the middle third); it keeps up when
  at most one unit ever waited and the lag grew by less than one chunk length.
* upload: the same file through `visit_create(clinician, recording=path)` + `visit_start`
  after the whole file is "in"; upload -> note = finished_at minus the moment before
  `visit_create` (as fan_out); TRANSCRIBE_CHUNK_SECONDS as configured (120 s default).

One `qcluster` for every case, Q_WORKERS as configured (default 2; WHISPER_CPU_THREADS=0 gives
each worker's model one of the 2 cores), PostgreSQL with the ORM broker, the offline LLM
engine (no OPENAI_API_KEY); after a warm-up upload (the sample repeated to 166 s: two chunks,
so both workers load their model). For each length the live case runs first, then the upload.
Also per case: max RSS of the cluster's processes (/proc, sampled once a second: the largest
single process, i.e. a worker with its model, and the whole process group, which includes the
live decoder's child), the cluster's CPU seconds, the cores other processes kept busy
meanwhile (/proc/stat minus ours; PostgreSQL counts as other), the rows written to the
database per audio minute (pg_stat_database inserts + updates + deletes of the bench database
over the case, every writer included, read 2.5 s after the run ended so that the backends
have flushed their counters; and the run's Unit + Checkpoint rows), the piece POSTs' latency,
and how far the live transcript's words are from the upload's (WER of one against the other).
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
import threading
import time
import uuid
from pathlib import Path

from common import (
    FIXTURES,
    SAMPLE_VISIT,
    Row,
    base_environment,
    cli,
    clinician,
    cluster,
    django_setup,
    emit,
    fmt,
    machine_busy_seconds,
    make_long_recording,
    median,
    migrate,
    percentile,
    pg_drop,
    pg_recreate,
    queue_purge,
    wait_for,
    workdir,
)
from fan_out import _f, _ogg_write, _seconds

NAME = "live"
DATABASE = "bench_live"
RATE = 16000
MIME = "audio/ogg;codecs=opus"
PIECE_SECONDS = 3.0  # the recorder's timeslice
CLIPS = (
    "cardiology_afib",
    "dermatology_eczema",
    "orthopedics_knee",
    "pediatrics_ear_infection",
    "primary_care_diabetes",
    "psychiatry_depression",
)
GOAL_STOP = 10.0  # s, Stop -> note, whatever the length
GOAL_LAG_CHUNKS = 2.0  # p95 lag, in live chunk lengths
SAMPLE_EVERY = 1.0  # s of wall time


# --- the recording --------------------------------------------------------------------------


def recording_build(dest: Path, minutes: float) -> tuple[Path, float]:
    """(an Ogg/Opus file of `minutes` of shuffled distinct speech, its length in seconds)."""
    import numpy as np
    from faster_whisper import decode_audio

    sources = [FIXTURES / "eval" / f"{slug}.ogg" for slug in CLIPS] + [SAMPLE_VISIT]
    clips = [decode_audio(str(path), sampling_rate=RATE) for path in sources]
    rng = np.random.default_rng(int(minutes * 1000))
    target = int(minutes * 60 * RATE)
    parts, total = [], 0
    while total < target:
        for index in rng.permutation(len(clips)):
            gap = np.zeros(int(rng.uniform(0.6, 2.4) * RATE), dtype=np.float32)
            clip = clips[index] * np.float32(rng.uniform(0.75, 1.0))
            parts += [clip, gap]
            total += len(clip) + len(gap)
    samples = np.concatenate(parts)[:target].copy()
    fade = int(0.05 * RATE)
    samples[-fade:] *= np.linspace(1, 0, fade, dtype=np.float32)
    pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
    _ogg_write(pcm, dest)
    return dest, len(pcm) / RATE


def ogg_timeline(data: bytes) -> tuple[list[int], list[float]]:
    """(the byte offset where each Ogg page ends, the seconds of audio decodable once that
    page is in): from the pages' granule positions (48 kHz for Opus) less the pre-skip."""
    ends: list[int] = []
    seconds: list[float] = []
    pos, preskip, last = 0, 0, 0.0
    while pos + 27 <= len(data):
        if data[pos : pos + 4] != b"OggS":
            raise ValueError(f"no Ogg page at byte {pos}")
        granule = int.from_bytes(data[pos + 6 : pos + 14], "little", signed=True)
        count = data[pos + 26]
        body = pos + 27 + count
        end = body + sum(data[pos + 27 : body])
        if data[body : body + 8] == b"OpusHead":
            preskip = int.from_bytes(data[body + 10 : body + 12], "little")
        if granule > 0:
            last = max(last, (granule - preskip) / 48000)
        ends.append(end)
        seconds.append(last)
        pos = end
    return ends, seconds


def pieces_cut(data: bytes, count: int) -> list[bytes]:
    """`data` as `count` consecutive, nearly equal byte ranges."""
    bounds = [round(i * len(data) / count) for i in range(count + 1)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# --- the cluster's processes ----------------------------------------------------------------


def group_processes(pgid: int) -> list[tuple[int, int, float, bool]]:
    """(pid, RSS bytes, CPU seconds incl. reaped children, is the live decoder) of the live
    processes of a process group (a `Child` and everything it started)."""
    tick = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:
                continue
            rss = int((stat.parent / "statm").read_text().split()[1]) * page
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        cpu = sum(int(v) for v in fields[11:15]) / tick  # utime stime cutime cstime
        found.append((int(stat.parent.name), rss, cpu, b"visits.speech.audio" in cmdline))
    return found


def group_cpu(pgid: int) -> float:
    return sum(cpu for _, _, cpu, _ in group_processes(pgid))


def db_writes() -> int:
    """Tuples inserted, updated and deleted in the bench database so far (every backend)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("select pg_stat_force_next_flush()")
        cursor.execute(
            "select tup_inserted + tup_updated + tup_deleted from pg_stat_database "
            "where datname = current_database()"
        )
        return int(cursor.fetchone()[0])


class Sampler(threading.Thread):
    """Once a second: the cluster's RSS; for a live visit also its transcript's heard_seconds
    (GET, with its own Client) against the audio sent so far, and the units waiting."""

    def __init__(
        self, pgid: int, user, *, visit_id: int | None = None, run_id: int | None = None, sent=None
    ) -> None:
        super().__init__(daemon=True)
        self.pgid, self.user, self.visit_id, self.sent = pgid, user, visit_id, sent
        self.run_id = run_id
        self.stop = threading.Event()
        self.samples: list[dict] = []
        self.rss_max = self.group_max = self.decoder_max = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        from django.db import connection
        from django.test import Client

        try:
            client = None
            if self.visit_id is not None:
                client = Client()
                client.force_login(self.user)
            started = time.monotonic()
            while not self.stop.is_set():
                tick = time.monotonic()
                self._rss()
                if client is not None and self.sent is not None and self.sent() is not None:
                    self._lag(client, tick - started)
                self.stop.wait(max(0.0, SAMPLE_EVERY - (time.monotonic() - tick)))
        except BaseException as exc:  # reported by the case, not lost in a thread
            self.error = exc
        finally:
            connection.close()

    def _rss(self) -> None:
        processes = group_processes(self.pgid)
        self.rss_max = max([self.rss_max] + [rss for _, rss, _, dec in processes if not dec])
        self.decoder_max = max([self.decoder_max] + [rss for _, rss, _, dec in processes if dec])
        self.group_max = max(self.group_max, sum(rss for _, rss, _, _ in processes))

    def _lag(self, client, at: float) -> None:
        from pipeline.core.models import Unit
        from pipeline.core.states import UnitStatus

        sent = self.sent()
        clock = time.perf_counter()
        response = client.get(f"/visits/{self.visit_id}/transcript/live/")
        took = time.perf_counter() - clock
        if response.status_code != 200:
            raise RuntimeError(f"live transcript: HTTP {response.status_code} {response.content!r}")
        body = response.json()
        waiting = Unit.objects.filter(
            stage__run_id=self.run_id, stage__name="transcribe", status=UnitStatus.READY
        ).count()
        self.samples.append(
            {
                "t": round(at, 2),
                "sent": round(sent, 2),
                "heard": round(body["heard_seconds"], 2),
                "lag": round(sent - body["heard_seconds"], 2),
                "state": body["state"],
                "waiting": waiting,
                "get_ms": round(took * 1000, 1),
            }
        )


# --- the cases ------------------------------------------------------------------------------


def run_wait(run_id: int, timeout: float):
    from pipeline.core.models import Run

    wait_for(
        lambda: Run.objects.filter(id=run_id, finished_at__isnull=False).exists(),
        timeout=timeout,
        poll=0.05,
    )
    return Run.objects.get(id=run_id)


def _run_facts(run) -> dict:
    """What the engine's rows say about a finished run."""
    from collections import Counter

    from pipeline.core.models import Attempt, Checkpoint, Stage, Unit
    from visits.schemas import TranscribeOutput
    from visits.speech.transcription import transcript_load

    stages = {stage.name: stage for stage in Stage.objects.filter(run=run)}
    transcribe = stages.get("transcribe")
    units = list(Unit.objects.filter(stage__run=run))
    attempts = list(Attempt.objects.filter(stage__run=run).select_related("stage"))
    text = ""
    if transcribe is not None and transcribe.output:
        transcript = transcript_load(TranscribeOutput.model_validate(transcribe.output))
        text = " ".join(segment.text for segment in transcript.segments)

    def stage_end(name: str):
        return stages[name].finished_at if name in stages else None

    return {
        "run_id": run.id,
        "status": run.status,
        "error": run.error[:300],
        "finished_at": run.finished_at,
        "transcribe_end": stage_end("transcribe"),
        "summarize_start": stages["summarize"].started_at if "summarize" in stages else None,
        "ingest": _seconds(stage_end("ingest"), stages["ingest"].started_at)
        if "ingest" in stages
        else None,
        "transcribe": _seconds(stage_end("transcribe"), transcribe.started_at)
        if transcribe
        else None,
        "llm": _seconds(stage_end("note"), stages["summarize"].started_at)
        if "summarize" in stages
        else None,
        "summarize": _seconds(stage_end("summarize"), stages["summarize"].started_at)
        if "summarize" in stages
        else None,
        "note": _seconds(stage_end("note"), stages["note"].started_at)
        if "note" in stages
        else None,
        "chunks": len(units),
        "per_worker": sorted(Counter(u.worker for u in units).values(), reverse=True),
        "unit_seconds": sum(u.seconds for u in units),
        "unit_max": max((u.seconds for u in units), default=0.0),
        "units_tried_twice": sum(1 for u in units if u.tries > 1),
        "rows_units_checkpoints": len(units) + Checkpoint.objects.filter(stage__run=run).count(),
        "failures": [
            f"{a.stage.name} #{a.number} {a.status} {a.error_code}: {a.error_message[:300]}"
            for a in attempts
            if a.status != "succeeded"
        ],
        "extra_attempts": sum(1 for a in attempts if a.number > 1),
        "text": text,
    }


class Meter:
    """CPU of the cluster, this process and the machine; DB writes; load, over one case."""

    def __init__(self, pgid: int) -> None:
        self.pgid = pgid
        self.writes = db_writes()
        self.cpu, self.mine = group_cpu(pgid), time.process_time()
        self.busy, self.clock = machine_busy_seconds(), time.monotonic()
        self.load = os.getloadavg()

    def done(self) -> dict:
        time.sleep(2.5)  # backends flush their counters within about a second of going idle
        clock = time.monotonic() - self.clock
        cpu = group_cpu(self.pgid) - self.cpu
        mine = time.process_time() - self.mine
        busy = machine_busy_seconds() - self.busy
        return {
            "cluster_cpu": cpu,
            "others": max(0.0, busy - cpu - mine) / clock,
            "db_writes": db_writes() - self.writes,
            "load_before": self.load[0],
            "load_after": os.getloadavg()[0],
        }


def live_case(child, user, recording: Path, duration: float, pace: float) -> dict:
    from django.db import connection
    from django.test import Client
    from django.utils import timezone

    from visits.models import Visit

    data = recording.read_bytes()
    ends, decodable = ogg_timeline(data)
    count = math.ceil(duration / PIECE_SECONDS)
    pieces = pieces_cut(data, count)
    interval = duration / count / pace  # wall seconds between two pieces
    client = Client()
    client.force_login(user)
    session = uuid.uuid4()
    sent_bytes: list[int] = []  # the bytes sent so far, once the first piece is sent

    def sent_audio() -> float | None:
        if not sent_bytes:
            return None
        page = bisect.bisect_right(ends, sent_bytes[-1]) - 1
        return decodable[page] if page >= 0 else 0.0

    meter = Meter(child.pid)
    response = client.post(f"/recordings/{session}/start/", {"mime": MIME})
    if response.status_code != 200:
        raise RuntimeError(f"start: HTTP {response.status_code} {response.content!r}")
    visit_id = response.json()["visit"]
    run_id = Visit.objects.get(pk=visit_id).current_run_id
    sampler = Sampler(child.pid, user, visit_id=visit_id, run_id=run_id, sent=sent_audio)
    sampler.start()
    began = time.monotonic()
    post_ms: list[float] = []
    total = 0
    try:
        for index, piece in enumerate(pieces):
            due = began + (index + 1) * interval
            time.sleep(max(0.0, due - time.monotonic()))
            clock = time.perf_counter()
            response = client.post(
                f"/recordings/{session}/pieces/{index}/",
                data=piece,
                content_type="application/octet-stream",
            )
            post_ms.append((time.perf_counter() - clock) * 1000)
            if response.status_code != 200:
                raise RuntimeError(
                    f"piece {index}: HTTP {response.status_code} {response.content!r}"
                )
            total += len(piece)
            sent_bytes.append(total)
        played = time.monotonic() - began
        sampler.stop.set()
        sampler.join(timeout=30)
        last = sampler.samples[-1] if sampler.samples else {}
        # Stop: the moment just before the finish POST.
        stopped = timezone.now()
        clock = time.perf_counter()
        response = client.post(f"/recordings/{session}/finish/", {"pieces": count})
        finish_post = time.perf_counter() - clock
        if response.status_code != 200:
            raise RuntimeError(f"finish: HTTP {response.status_code} {response.content!r}")
        tail = Sampler(child.pid, user)
        tail.start()
        run = run_wait(run_id, 600)
        tail.stop.set()
        tail.join(timeout=30)
    finally:
        sampler.stop.set()
    if sampler.error is not None:
        raise sampler.error
    facts = _run_facts(run)
    facts |= meter.done()
    samples = sampler.samples
    lags = [s["lag"] for s in samples]
    third = len(lags) // 3
    growth = (median(lags[2 * third :]) or 0) - (median(lags[third : 2 * third]) or 0)
    facts |= {
        "kind": "live",
        "pace": pace,
        "pieces": count,
        "piece_bytes": round(len(data) / count),
        "planned_play": duration / pace,
        "played": played,
        "stop_to_note": _seconds(run.finished_at, stopped),
        "stop_to_transcribed": _seconds(facts["transcribe_end"], stopped),
        "finish_post": finish_post,
        "lag_p50": percentile(lags, 0.50),
        "lag_p95": percentile(lags, 0.95),
        "lag_max": max(lags, default=None),
        "lag_growth": growth if third else None,
        "lag_at_stop": last.get("lag"),
        "waiting_max": max((s["waiting"] for s in samples), default=None),
        "samples": len(samples),
        "get_ms_p95": percentile([s["get_ms"] for s in samples], 0.95),
        "post_ms_p50": percentile(post_ms, 0.50),
        "post_ms_p95": percentile(post_ms, 0.95),
        "post_ms_max": max(post_ms, default=None),
        "rss_max": max(sampler.rss_max, tail.rss_max),
        "group_max": max(sampler.group_max, tail.group_max),
        "decoder_max": max(sampler.decoder_max, tail.decoder_max),
        "series": samples,
    }
    connection.close()
    return facts


def upload_case(child, user, recording: Path) -> dict:
    from django.utils import timezone

    from visits.services import visit_create, visit_start

    meter = Meter(child.pid)
    sampler = Sampler(child.pid, user)
    sampler.start()
    try:
        started = timezone.now()
        visit = visit_create(clinician=user, recording=recording)
        visit_start(visit=visit)
        run = run_wait(visit.current_run_id, 900)
    finally:
        sampler.stop.set()
        sampler.join(timeout=30)
    facts = _run_facts(run) | meter.done()
    facts |= {
        "kind": "upload",
        "upload_to_note": _seconds(run.finished_at, started),
        "rss_max": sampler.rss_max,
        "group_max": sampler.group_max,
    }
    return facts


def warm_up(child, user, recording: Path, workers: int, rounds: int = 6) -> dict:
    """Two uploads at once, again until every worker has loaded its model (taken a unit) and
    run a summarize (whose first call in a process loads the drug dictionary, seconds)."""
    from pipeline.core.models import Attempt, Unit
    from visits.services import visit_create, visit_start

    heard: set[str] = set()
    summarized: set[str] = set()
    done = 0
    for _ in range(rounds):
        visits = [visit_create(clinician=user, recording=recording) for _ in range(2)]
        for visit in visits:
            visit_start(visit=visit)
        for visit in visits:
            run = run_wait(visit.current_run_id, 300)
            if run.status != "succeeded":
                raise RuntimeError(f"warm-up run {run.id} {run.status}: {run.error}")
            heard |= set(Unit.objects.filter(stage__run=run).values_list("worker", flat=True))
            summarized |= set(
                Attempt.objects.filter(stage__run=run, stage__name="summarize").values_list(
                    "worker", flat=True
                )
            )
            done += 1
        if len(heard) >= workers and len(summarized) >= workers:
            break
    return {"runs": done, "heard": len(heard), "summarized": len(summarized)}


# --- rows -----------------------------------------------------------------------------------


def _mib(value: int) -> str:
    return f"{value / 2**20:.0f} MiB"


def _problems(facts: dict) -> list[str]:
    problems = []
    if facts["status"] != "succeeded":
        problems.append(
            f"run {facts['run_id']} {facts['status']} ({facts['error']}; "
            f"{' | '.join(facts['failures'])})"
        )
    if facts["units_tried_twice"]:
        problems.append(f"{facts['units_tried_twice']} unit(s) tried twice")
    if facts["extra_attempts"]:
        problems.append("a stage needed a second attempt")
    return problems


def length_rows(
    minutes: float, duration: float, live: dict, upload: dict, chunk: float
) -> list[Row]:
    label = f"{minutes:g} min"
    stop, full = live["stop_to_note"], upload["upload_to_note"]
    ratio = stop / full if stop is not None and full else None
    audio_min = duration / 60
    problems = _problems(live) + [f"upload: {p}" for p in _problems(upload)]
    keeps_up = (live["waiting_max"] or 0) <= 1 and (live["lag_growth"] or 0) < chunk
    in_chunks = [None if v is None else v / chunk for v in (live["lag_p50"], live["lag_p95"])]
    rows = [
        Row(
            NAME,
            f"Stop -> note committed, {label} live (pace {live['pace']:g}x)",
            fmt(stop, digits=2),
            baseline=f"{_f(full)} s upload -> note",
            ratio=f"{ratio:.3f}x" if ratio is not None else "n/a",
            goal=f"<= {GOAL_STOP:g} s",
            verdict="meets" if stop is not None and stop <= GOAL_STOP else "MISSES",
            note=(
                f"finish POST {_f(live['finish_post'], 3)} s; Stop -> transcribe committed "
                f"{_f(live['stop_to_transcribed'])} s, summarize + note {_f(live['llm'], 3)} s "
                f"(summarize {_f(live['summarize'], 3)}, note {_f(live['note'], 3)}; upload's "
                f"{_f(upload['llm'], 3)} s); "
                f"lag at Stop {_f(live['lag_at_stop'], 1)} s; {live['chunks']} live chunks, units "
                f"per worker {'/'.join(map(str, live['per_worker']))}; upload: ingest "
                f"{_f(upload['ingest'])} s, transcribe {_f(upload['transcribe'])} s, "
                f"{upload['chunks']} chunks, units per worker "
                f"{'/'.join(map(str, upload['per_worker']))}; other processes kept "
                f"{live['others']:.2f} / {upload['others']:.2f} cores busy (live / upload)"
                + (f"; {'; '.join(problems)}" if problems else "")
            ),
            extra={k: v for k, v in live.items() if k not in ("text", "series")}
            | {"upload": {k: v for k, v in upload.items() if k != "text"}, "duration": duration},
        ),
        Row(
            NAME,
            f"transcription lag during the visit, {label} (pace {live['pace']:g}x)",
            f"p50 {_f(live['lag_p50'], 1)} s ({_f(in_chunks[0])} chunks), "
            f"p95 {_f(live['lag_p95'], 1)} s ({_f(in_chunks[1])} chunks)",
            goal=f"p95 <= {GOAL_LAG_CHUNKS:g} chunks ({GOAL_LAG_CHUNKS * chunk:g} s)",
            verdict="meets"
            if in_chunks[1] is not None and in_chunks[1] <= GOAL_LAG_CHUNKS
            else "MISSES",
            note=(
                f"audio sent - heard_seconds, {live['samples']} samples 1/s; max "
                f"{_f(live['lag_max'], 1)} s; growth (last third - middle third, medians) "
                f"{_f(live['lag_growth'], 1)} s; max units waiting unclaimed "
                f"{live['waiting_max']}: workers {'keep up' if keeps_up else 'DO NOT keep up'}; "
                f"played {live['played']:.0f} s for {live['planned_play']:.0f} s planned; "
                f"live GET p95 {_f(live['get_ms_p95'], 0)} ms"
            ),
            extra={"series": live["series"], "chunk_seconds": chunk, "keeps_up": keeps_up},
        ),
        Row(
            NAME,
            f"max RSS of the cluster, {label}",
            f"{_mib(live['rss_max'])} live / {_mib(upload['rss_max'])} upload",
            note=(
                f"largest single process (a worker); whole process group "
                f"{_mib(live['group_max'])} / {_mib(upload['group_max'])}; live decoder child "
                f"{_mib(live['decoder_max'])}; cluster CPU {live['cluster_cpu']:.0f} / "
                f"{upload['cluster_cpu']:.0f} s"
            ),
        ),
        Row(
            NAME,
            f"database rows written per audio minute, {label}",
            f"{live['db_writes'] / audio_min:.0f} live / {upload['db_writes'] / audio_min:.0f} "
            "upload",
            note=(
                f"pg_stat_database inserts+updates+deletes over the case, every writer; Unit + "
                f"Checkpoint rows per audio minute {live['rows_units_checkpoints'] / audio_min:.1f}"
                f" / {upload['rows_units_checkpoints'] / audio_min:.1f}; piece POST p50 / p95 / "
                f"max {_f(live['post_ms_p50'], 1)} / {_f(live['post_ms_p95'], 1)} / "
                f"{_f(live['post_ms_max'], 1)} ms ({live['pieces']} pieces of ~"
                f"{live['piece_bytes']} B)"
            ),
        ),
    ]
    if live["text"] and upload["text"]:
        from visits.quality.evaluation import word_error_rate

        rows.append(
            Row(
                NAME,
                f"live transcript against the upload's, {label}",
                f"{word_error_rate(upload['text'], live['text']) * 100:.1f}% WER",
                note=f"words {len(live['text'].split())} live / {len(upload['text'].split())} "
                f"upload (chunks {chunk:g} s / upload chunk size)",
            )
        )
    return rows


# --- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = cli(NAME, __doc__.splitlines()[0])
    parser.add_argument(
        "--minutes", type=float, nargs="+", default=None, help="recording lengths (10 30 60)"
    )
    parser.add_argument(
        "--pace",
        type=float,
        nargs="+",
        default=None,
        help="wall-clock speed of the live play, one per length or one for all (1 6 6)",
    )
    args = parser.parse_args()
    minutes = args.minutes or ([1.0] if args.quick else [10.0, 30.0, 60.0])
    paces = args.pace or ([4.0] if args.quick else [1.0] + [6.0] * (len(minutes) - 1))
    if len(paces) == 1:
        paces = paces * len(minutes)
    if len(paces) != len(minutes):
        parser.error("--pace takes one value, or one per --minutes")
    rows: list[Row] = []
    with workdir(NAME) as tmp:
        recordings = [recording_build(tmp / f"visit_{m:g}min.ogg", m) for m in minutes]
        warm = make_long_recording(tmp / "warm.wav", repeats=4)
        env = base_environment(tmp, pg_recreate(DATABASE))
        django_setup(env)
        try:
            from django.conf import settings

            migrate()
            queue_purge()
            user = clinician()
            chunk = settings.TRANSCRIBE_LIVE_CHUNK_SECONDS
            child = cluster(env, tmp / "cluster.log")
            load_before = os.getloadavg()
            try:
                warm_run = warm_up(child, user, warm, settings.Q_CLUSTER["workers"])
                for m, (path, duration), pace in zip(minutes, recordings, paces, strict=True):
                    print(f"== {m:g} min: live at {pace:g}x, then upload", flush=True)
                    live = live_case(child, user, path, duration, pace)
                    upload = upload_case(child, user, path)
                    rows += length_rows(m, duration, live, upload, chunk)
            finally:
                child.kill()
            log = child.log()
            rows.append(
                Row(
                    NAME,
                    "setup",
                    f"Q_WORKERS={settings.Q_CLUSTER['workers']}, live chunk {chunk:g} s, upload "
                    f"chunk {settings.TRANSCRIBE_CHUNK_SECONDS:g} s",
                    note=(
                        f"warm-up: {warm_run['runs']} uploads of 166 s, 2 at a time, until "
                        f"{warm_run['heard']} workers had taken a unit and "
                        f"{warm_run['summarized']} had run summarize; "
                        f"load average (1 min) {load_before[0]:.2f} before / "
                        f"{os.getloadavg()[0]:.2f} after; tracebacks in the cluster log: "
                        f"{log.count('Traceback')}"
                    ),
                )
            )
        finally:
            if not os.environ.get("BENCH_KEEP"):
                pg_drop(DATABASE)
    emit(rows, args.json)


if __name__ == "__main__":
    main()
