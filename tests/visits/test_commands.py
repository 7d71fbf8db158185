"""The command-line contract that batch users and the held-out checks depend on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django_q.models import OrmQ

from tests.conftest import SHORT_VISIT
from tests.support.audit import AUDITED
from visits.models import Visit

pytestmark = pytest.mark.django_db

STAGES = ["ingest", "transcribe", "summarize", "note"]


def run_json(*args: str) -> dict:
    out = StringIO()
    call_command(*args, "--json", stdout=out)
    return json.loads(out.getvalue())


def test_process_recording_inline_prints_the_final_status_document(clinician):
    document = run_json("process_recording", str(SHORT_VISIT), "--inline", "--clinician", "dr_ada")

    assert document["status"] == "succeeded"
    assert [stage["name"] for stage in document["stages"]] == STAGES
    for stage in document["stages"]:
        assert stage["status"] == "succeeded"
        (attempt,) = stage["attempts"]
        assert attempt["number"] == 1 and attempt["status"] == "succeeded"
        assert datetime.fromisoformat(attempt["finished_at"]) >= datetime.fromisoformat(
            attempt["started_at"]
        )
        assert set(attempt) >= {"error", "input_tokens", "output_tokens", "cost_usd"}
    segments = document["transcript"]["segments"]
    assert [segment["id"] for segment in segments] == list(range(len(segments)))
    assert all(s["start"] <= s["end"] for s in segments)
    assert "ibuprofen" in document["transcript"]["text"].lower()
    assert document["summary"]["medications"][0]["name"].lower() == "ibuprofen"
    assert document["note"]["soap"]["plan"]
    assert document["usage"] == {
        "input_tokens": 0,
        "output_tokens": 0,
        "cost_usd": 0.0,
        "audio_seconds": pytest.approx(11.76, abs=0.2),
    }
    assert Visit.objects.get(pk=document["visit"]).clinician == clinician

    assert run_json("visit_status", str(document["visit"]), *AUDITED) == document


def test_process_recording_without_inline_enqueues_and_returns_at_once(
    django_capture_on_commit_callbacks,
):
    with django_capture_on_commit_callbacks(execute=True):
        document = run_json("process_recording", str(SHORT_VISIT))
    assert document["status"] == "queued"
    assert document["stages"][0]["status"] == "ready"
    assert all(not stage["attempts"] for stage in document["stages"])
    assert OrmQ.objects.count() == 1
    visit = Visit.objects.get(pk=document["visit"])
    assert visit.clinician.username == "pipeline-cli"
    assert not visit.clinician.has_usable_password()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["process_recording", "/nonexistent/visit.mp3"], "no such file"),
        (["process_recording", str(settings.BASE_DIR / "fixtures")], "not a regular file"),
        (["process_recording", str(SHORT_VISIT), "--clinician", "nobody"], "No user named"),
        (["process_recording", str(settings.BASE_DIR / "README.md")], "not a recording format"),
        (["visit_status", "999999", *AUDITED], "No visit with id 999999"),
    ],
)
def test_bad_arguments_are_command_errors_that_say_what_to_fix(args, message):
    with pytest.raises(CommandError, match=message):
        call_command(*args, stdout=StringIO())
    assert not Visit.objects.exists()


def test_visit_status_human_output(clinician):
    document = run_json("process_recording", str(SHORT_VISIT), "--inline")
    out = StringIO()
    call_command("visit_status", str(document["visit"]), *AUDITED, stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0] == f"visit {document['visit']}: succeeded"
    assert [line.split()[0] for line in lines[1:5]] == STAGES
    assert lines[5] == "  note: version 1, draft"
    assert lines[6] == "  consent: elsewhere, active"
    assert lines[7].startswith("  usage: 0 tokens in, 0 out, $0.0000")


def test_the_real_cli_keeps_stdout_for_json_and_logs_on_stderr(tmp_path):
    """As an operator runs it: a separate process, a fresh database, exit code 0."""
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'cli.sqlite3'}",
        "PRIVATE_STORAGE_ROOT": str(tmp_path / "private"),
        "HF_HUB_OFFLINE": "1",
        "OPENAI_API_KEY": "",
    }
    manage = [sys.executable, str(settings.BASE_DIR / "manage.py")]
    subprocess.run([*manage, "migrate", "-v0"], env=env, check=True)
    done = subprocess.run(
        [
            *manage,
            "process_recording",
            str(SHORT_VISIT),
            "--consent",
            "verbal",
            "--inline",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "succeeded"
    assert json.loads(done.stdout)["consent"]["method"] == "verbal"
    assert "stage transcribe attempt 1 succeeded" in done.stderr
