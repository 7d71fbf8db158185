"""The operations dashboard: its numbers against the ledger, its window, its access rules and
its query count. Rows are made directly through the ORM; what is under test is the reading."""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from pipeline.core.models import (
    Attempt,
    AttemptStatus,
    AuditEntry,
    LLMCall,
    OperatorAction,
    Run,
    RunStatus,
    Stage,
    StageStatus,
)
from pipeline.core.states import FailureKind
from pipeline.ops import charts
from pipeline.ops.dashboard import Spend, dashboard_get, percentile, window_start

pytestmark = pytest.mark.django_db

URL = "/ops/dashboard/"
STAGES = ["ingest", "transcribe", "summarize", "note"]
_digests = itertools.count()


# --- building rows ---------------------------------------------------------------------------


def make_run(*, forked_from: Run | None = None, fork_stage: str = "", workflow: str = "visit"):
    return Run.objects.create(
        workflow=workflow,
        subject=f"thing:{next(_digests)}",
        status=RunStatus.SUCCEEDED,
        forked_from=forked_from,
        fork_stage=fork_stage,
    )


def make_stage(
    run: Run,
    name: str,
    *,
    status: str = StageStatus.SUCCEEDED,
    error_code: str = "",
    at=None,
    failure_kind: str = FailureKind.PERMANENT,
) -> Stage:
    return Stage.objects.create(
        run=run,
        name=name,
        position=STAGES.index(name) if name in STAGES else 0,
        status=status,
        error_code=error_code,
        failure_kind=failure_kind if status == StageStatus.FAILED else "",
        finished_at=at or timezone.now(),
    )


def make_attempt(
    stage: Stage,
    number: int = 1,
    *,
    status: str = AttemptStatus.SUCCEEDED,
    at: datetime | None = None,
    seconds: float = 1.0,
    error_code: str = "",
    **fields,
) -> Attempt:
    started = at or timezone.now() - timedelta(minutes=5)
    return Attempt.objects.create(
        stage=stage,
        number=number,
        status=status,
        started_at=started,
        finished_at=started + timedelta(seconds=seconds),
        error_code=error_code,
        **fields,
    )


def make_call(attempt: Attempt, model: str, tokens_in: int, tokens_out: int, cost: str, at=None):
    call = LLMCall.objects.create(
        stage_id=attempt.stage_id,
        attempt=attempt,
        digest=f"d{next(_digests)}",
        model=model,
        content="{}",
        input_tokens=tokens_in,
        output_tokens=tokens_out,
        cost_usd=Decimal(cost),
    )
    if at is not None:
        LLMCall.objects.filter(id=call.id).update(created_at=at)
    return call


def days_ago(n: int) -> datetime:
    """Noon, `n` days before today; now for n=0."""
    if n == 0:
        return timezone.now()
    noon = datetime.combine(timezone.localdate() - timedelta(days=n), datetime.min.time())
    return timezone.make_aware(noon) + timedelta(hours=12)


@pytest.fixture
def ledger():
    """Two visits, one with a failed-then-retried summary, and a re-run of the note forked from
    the first; calls on three days, two models, failed attempts included."""
    first = make_run()
    summarize = make_stage(first, "summarize")
    note = make_stage(first, "note")
    failed = make_attempt(summarize, 1, status=AttemptStatus.FAILED, error_code="rate_limited")
    retried = make_attempt(summarize, 2)
    make_call(failed, "gpt-4o-mini", 1200, 0, "0.000180", at=days_ago(2))  # paid, then failed
    make_call(retried, "gpt-4o-mini", 1200, 350, "0.000390", at=days_ago(2))
    make_call(make_attempt(note), "gpt-4o", 900, 600, "0.008250", at=days_ago(1))

    fork = make_run(forked_from=first, fork_stage="note")
    make_stage(fork, "summarize")  # reused by reference: no attempt, no call
    fork_note = make_stage(fork, "note")
    make_call(make_attempt(fork_note), "gpt-4o", 950, 640, "0.008775", at=days_ago(0))
    make_call(make_attempt(fork_note, 2), "gpt-4o-mini", 100, 20, "0.000027", at=days_ago(0))

    second = make_run()
    s2 = make_stage(second, "summarize", status=StageStatus.FAILED, error_code="output_invalid")
    bad = make_attempt(s2, status=AttemptStatus.FAILED, error_code="output_invalid")
    make_call(bad, "gpt-4o-mini", 1300, 400, "0.000435", at=days_ago(1))
    make_call(bad, "gpt-4o-mini", 1500, 410, "0.000471", at=days_ago(1))  # the repair try
    return first, fork, second


def ledger_sums(key) -> dict[str, tuple[int, int, int, Decimal]]:
    """(calls, tokens in, tokens out, dollars) per group, summed in Python from every row."""
    sums: dict[str, list] = defaultdict(lambda: [0, 0, 0, Decimal(0)])
    for call in LLMCall.objects.select_related("stage"):
        row = sums[key(call)]
        row[0] += 1
        row[1] += call.input_tokens
        row[2] += call.output_tokens
        row[3] += call.cost_usd
    return {k: tuple(v) for k, v in sums.items()}


def as_tuple(spend) -> tuple[int, int, int, Decimal]:
    return (spend.calls, spend.input_tokens, spend.output_tokens, spend.cost_usd)


# --- the numbers reconcile with the ledger ---------------------------------------------------


def test_totals_equal_the_ledger_per_stage_per_model_and_per_day(ledger):
    board = dashboard_get(days=30)

    (everything,) = ledger_sums(lambda call: "all").values()
    assert as_tuple(board.spend_total) == everything == (7, 7150, 2420, Decimal("0.018528"))

    assert {r.label: as_tuple(r) for r in board.spend_by_stage} == ledger_sums(
        lambda call: call.stage.name
    )
    assert {r.label: as_tuple(r) for r in board.spend_by_model} == ledger_sums(
        lambda call: call.model
    )
    by_day = {r.label: as_tuple(r) for r in board.spend_by_day if r.calls}
    assert by_day == ledger_sums(lambda call: timezone.localdate(call.created_at).isoformat())
    assert len(board.spend_by_day) == 30  # every day of the window, empty ones included

    for breakdown in (board.spend_by_stage, board.spend_by_model, board.spend_by_day):
        assert as_tuple(_sum(breakdown)) == everything


def _sum(rows: list[Spend]) -> Spend:
    return Spend(
        label="sum",
        calls=sum(r.calls for r in rows),
        input_tokens=sum(r.input_tokens for r in rows),
        output_tokens=sum(r.output_tokens for r in rows),
        cost_usd=sum((r.cost_usd for r in rows), Decimal(0)),
    )


def test_calls_on_failed_attempts_and_forked_runs_are_counted(ledger):
    board = dashboard_get(days=30)
    failed_calls = LLMCall.objects.filter(attempt__status=AttemptStatus.FAILED)
    forked_calls = LLMCall.objects.filter(stage__run__forked_from__isnull=False)
    assert failed_calls.count() == 3 and forked_calls.count() == 2
    note = next(r for r in board.spend_by_stage if r.label == "note")
    assert note.calls == 3  # the first run's note and both attempts of the fork's note
    assert note.cost_usd == Decimal("0.008250") + Decimal("0.008775") + Decimal("0.000027")


def test_the_page_shows_the_ledger_totals(ledger, admin_client):
    response = admin_client.get(URL)

    assert response.status_code == 200
    page = response.content.decode()
    assert "7,150 / 2,420" in page  # tokens in / out
    assert "$0.0185" in page  # dollars, to four places
    assert page.count("0.0185") >= 4  # the totals rows of stage, model and day, and the tile
    assert "<svg" in page
    # The charts need no script; the page's only scripts are the site's own static files.
    scripts = re.findall(r"<script[^>]*>", page)
    assert all('src="/static/' in tag for tag in scripts), scripts


# --- attempts: durations, failures, retries, saved by resume ---------------------------------


def test_p50_and_p95_of_succeeded_attempts_per_stage():
    run = make_run()
    transcribe = make_stage(run, "transcribe")
    for n, seconds in enumerate([7, 3, 10, 1, 5, 9, 2, 8, 4, 6], start=1):
        make_attempt(transcribe, n, seconds=seconds)
    make_attempt(transcribe, 11, status=AttemptStatus.FAILED, seconds=5000)  # not counted
    make_attempt(make_stage(run, "note"), seconds=42.5)

    stages = {r.label: r for r in dashboard_get(days=30).stages}

    assert stages["transcribe"].p50_seconds == pytest.approx(5.5)
    assert stages["transcribe"].p95_seconds == pytest.approx(9.55)
    assert stages["note"].p50_seconds == pytest.approx(42.5)
    assert stages["note"].p95_seconds == pytest.approx(42.5)
    assert [r.label for r in dashboard_get(days=30).stages] == ["transcribe", "note"]


def test_percentile_interpolates_like_percentile_cont():
    assert percentile([], 0.5) is None
    assert percentile([4.0], 0.95) == 4.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([0.0, 10.0], 0.95) == pytest.approx(9.5)


def test_failures_by_stage_and_error_type():
    run = make_run()
    summarize = make_stage(run, "summarize")
    make_attempt(summarize, 1, status=AttemptStatus.FAILED, error_code="rate_limited")
    make_attempt(summarize, 2, status=AttemptStatus.FAILED, error_code="rate_limited")
    make_attempt(summarize, 3, status=AttemptStatus.LOST, error_code="lease_lost")
    make_attempt(summarize, 4)
    other = make_run()
    note = make_stage(other, "note", status=StageStatus.FAILED, error_code="output_invalid")
    make_attempt(note, 1, status=AttemptStatus.FAILED, error_code="output_invalid")
    make_attempt(note, 2, status=AttemptStatus.CANCELLED)  # cancelled is not a failure

    board = dashboard_get(days=30)

    rows = [
        (
            r.stage,
            r.error_code,
            r.failed_attempts,
            r.lost_attempts,
            r.stages_failed_permanently,
            r.stages_gave_up,
        )
        for r in board.failures
    ]
    assert rows == [
        ("summarize", "lease_lost", 0, 1, 0, 0),
        ("summarize", "rate_limited", 2, 0, 0, 0),
        ("note", "output_invalid", 1, 0, 1, 0),
    ]
    total = board.failures_total
    assert (total.failed_attempts, total.lost_attempts) == (3, 1)
    assert (total.stages_failed_permanently, total.stages_gave_up) == (1, 0)
    stages = {r.label: r for r in board.stages}
    assert (stages["summarize"].failed, stages["summarize"].lost) == (2, 1)
    assert (stages["summarize"].retries, stages["summarize"].recovered) == (3, 1)
    assert (stages["note"].retries, stages["note"].recovered) == (1, 0)
    assert board.stages_total.retries == 4


def test_reruns_and_operator_actions(admin_user):
    first = make_run()
    for stage in ["note", "note", "summarize"]:
        make_run(forked_from=first, fork_stage=stage)
    for action in [OperatorAction.RETRY, OperatorAction.RETRY, OperatorAction.CANCEL]:
        AuditEntry.objects.create(
            action=action, actor=admin_user, actor_label="admin", run=first, reason="outage"
        )

    board = dashboard_get(days=30)

    assert [(r.label, r.count) for r in board.reruns_by_stage] == [("note", 2), ("summarize", 1)]
    assert board.reruns_total == 3
    assert {r.label: r.count for r in board.operator_actions} == {
        "Retry failed stage": 2,
        "Run now": 0,
        "Re-run from stage": 0,
        "Cancel": 1,
    }
    assert board.operator_actions_total == 3


def test_audio_hours_and_saved_by_resume_sums():
    run = make_run()
    transcribe = make_stage(run, "transcribe")
    make_attempt(transcribe, 1, status=AttemptStatus.LOST, audio_seconds=1800.0)
    make_attempt(transcribe, 2, audio_seconds=1800.0, saved_audio_seconds=1800.0)
    fork = make_run(forked_from=run, fork_stage="summarize")
    summarize = make_stage(fork, "summarize")
    make_attempt(
        summarize,
        saved_input_tokens=1000,
        saved_output_tokens=200,
        saved_cost_usd=Decimal("0.000270"),
    )
    make_attempt(
        make_stage(fork, "note"),
        saved_input_tokens=500,
        saved_output_tokens=50,
        saved_cost_usd=Decimal("0.001250"),
        saved_audio_seconds=1800.0,
    )

    board = dashboard_get(days=30)

    assert board.audio_hours == pytest.approx(1.0)
    total = board.stages_total
    assert (total.saved_input_tokens, total.saved_output_tokens) == (1500, 250)
    assert total.saved_cost_usd == Decimal("0.001520")
    assert total.saved_audio_seconds == pytest.approx(3600.0)
    assert board.saved_audio_hours == pytest.approx(1.0)
    by_stage = {r.label: r for r in board.stages}
    assert by_stage["summarize"].saved_cost_usd == Decimal("0.000270")
    assert by_stage["transcribe"].saved_audio_seconds == pytest.approx(1800.0)


# --- the window ------------------------------------------------------------------------------


def test_only_rows_inside_the_window_count():
    run = make_run()
    stage = make_stage(
        run,
        "summarize",
        status=StageStatus.FAILED,
        error_code="boom",
        failure_kind=FailureKind.EXHAUSTED,
    )
    old = make_attempt(stage, 1, at=days_ago(40), status=AttemptStatus.FAILED, error_code="boom")
    recent = make_attempt(stage, 2, at=days_ago(10), saved_input_tokens=7)
    today = make_attempt(stage, 3, at=days_ago(0), status=AttemptStatus.FAILED, error_code="boom")
    make_call(old, "m", 1000, 100, "1.000000", at=days_ago(40))
    make_call(recent, "m", 200, 20, "0.200000", at=days_ago(10))
    make_call(today, "m", 3, 1, "0.003000", at=days_ago(0))
    Stage.objects.filter(id=stage.id).update(finished_at=days_ago(10))
    fork = make_run(forked_from=run, fork_stage="summarize")
    Run.objects.filter(id=fork.id).update(created_at=days_ago(40))

    def seen(days: int):
        board = dashboard_get(days=days)
        return (
            board.spend_total.input_tokens,
            board.spend_total.cost_usd,
            board.stages_total.attempts,
            board.failures_total.failed_attempts,
            board.failures_total.stages_gave_up,
            board.stages_total.saved_input_tokens,
            board.reruns_total,
        )

    assert seen(1) == (3, Decimal("0.003000"), 1, 1, 0, 0, 0)
    assert seen(30) == (203, Decimal("0.203000"), 2, 1, 1, 7, 0)
    assert seen(90) == (1203, Decimal("1.203000"), 3, 2, 1, 7, 1)
    assert len(dashboard_get(days=7).spend_by_day) == 7


def test_the_window_is_whole_days_ending_today():
    now = timezone.make_aware(datetime(2025, 3, 10, 15, 30))
    assert window_start(days=1, now=now) == timezone.make_aware(datetime(2025, 3, 10))
    assert window_start(days=30, now=now) == timezone.make_aware(datetime(2025, 2, 9))
    run = make_run()
    attempt = make_attempt(make_stage(run, "note"), at=now - timedelta(hours=1))
    make_call(attempt, "m", 1, 1, "0.000001", at=timezone.make_aware(datetime(2025, 3, 9, 23, 59)))
    make_call(attempt, "m", 10, 1, "0.000010", at=timezone.make_aware(datetime(2025, 3, 10)))

    board = dashboard_get(days=1, now=now)

    assert board.spend_total.input_tokens == 10
    assert [r.label for r in board.spend_by_day] == ["2025-03-10"]


# --- the page: access, parameters, queries ---------------------------------------------------


def test_anonymous_users_are_sent_to_log_in(client):
    response = client.get(URL)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


def test_a_clinician_who_is_not_staff_cannot_see_it(client, clinician):
    client.force_login(clinician)
    response = client.get(URL)
    assert response.status_code == 403
    assert b"Tokens" not in response.content


def test_staff_see_it(client, django_user_model):
    staff = django_user_model.objects.create_user(username="oncall", password="x", is_staff=True)
    client.force_login(staff)
    response = client.get(reverse("pipeline:dashboard"))
    assert response.status_code == 200
    assert b"last 30 days" in response.content


@pytest.mark.parametrize("days", ["abc", "0", "-3", "367", "1e3", "7.5", "99999999999999999999"])
def test_a_bad_window_is_a_400_not_a_500(admin_client, days):
    response = admin_client.get(URL, {"days": days})
    assert response.status_code == 400


@pytest.mark.parametrize(("days", "shown"), [("", b"last 30 days"), ("7", b"last 7 days")])
def test_a_good_window_is_used(admin_client, days, shown):
    response = admin_client.get(URL, {"days": days})
    assert response.status_code == 200
    assert shown in response.content


def test_the_page_runs_a_bounded_number_of_queries(admin_client, django_assert_max_num_queries):
    now = timezone.now()
    runs = Run.objects.bulk_create(
        [Run(workflow="visit", subject=f"v:{i}", status=RunStatus.SUCCEEDED) for i in range(200)]
    )
    stages = Stage.objects.bulk_create(
        [
            Stage(run=run, name=name, position=i, status=StageStatus.SUCCEEDED, finished_at=now)
            for run in runs
            for i, name in enumerate(STAGES)
        ]
    )
    attempts = Attempt.objects.bulk_create(
        [
            Attempt(
                stage=stage,
                number=n,
                status=AttemptStatus.FAILED if n == 1 else AttemptStatus.SUCCEEDED,
                error_code="rate_limited" if n == 1 else "",
                started_at=now - timedelta(seconds=30 + n),
                finished_at=now - timedelta(seconds=n),
                audio_seconds=60.0 if stage.name == "transcribe" else 0.0,
            )
            for stage in stages
            for n in (1, 2)
        ]
    )
    LLMCall.objects.bulk_create(
        [
            LLMCall(
                stage_id=a.stage_id,
                attempt=a,
                digest=f"q{a.id}",
                model="gpt-4o-mini",
                content="{}",
                input_tokens=100,
                output_tokens=10,
                cost_usd=Decimal("0.000021"),
            )
            for a in attempts
        ]
    )

    # Ten for the window, two for the budgets, and the session and its user.
    with django_assert_max_num_queries(14):
        response = admin_client.get(URL)

    assert response.status_code == 200
    assert "160,000 / 16,000" in response.content.decode()  # 1,600 calls of 100 + 10 tokens


# --- charts ----------------------------------------------------------------------------------


def test_charts_escape_their_text_and_need_no_script():
    svg = charts.bar_chart(
        ["<b>day</b>"], [charts.Series("in & out", [3])], title='"quoted" <title>'
    )
    assert "<b>day</b>" not in svg and "&lt;b&gt;day&lt;/b&gt;" in svg
    assert "in &amp; out" in svg and "&quot;quoted&quot;" in svg
    assert "<script" not in svg
    line = charts.line_chart(["a", "b"], [Decimal("0.5"), 0], title="t", name="USD")
    assert "<polyline" in line and line.count("<circle") == 2


def test_nice_ceiling_and_number_formats():
    assert [charts.nice_ceiling(v) for v in (0, 0.7, 3, 7, 180, 2400)] == [
        1.0,
        1.0,
        5,
        10,
        200,
        2500,
    ]
    assert charts.compact(1234) == "1.2k" and charts.compact(3_400_000) == "3.4M"
    assert charts.dollars(12.5) == "$12.50" and charts.dollars(0.0123) == "$0.0123"


def test_the_budgets_show_what_is_left_and_warn_when_the_day_is_spent(admin_client, settings):
    run = Run.objects.create(workflow="visit", subject="visit:7", status=RunStatus.SUCCEEDED)
    stage = Stage.objects.create(run=run, name="summarize", position=0)
    attempt = Attempt.objects.create(
        stage=stage, number=1, status=AttemptStatus.SUCCEEDED, started_at=timezone.now()
    )
    LLMCall.objects.create(
        stage=stage,
        attempt=attempt,
        digest="d",
        model="gpt-4o-mini",
        content="{}",
        input_tokens=900,
        output_tokens=100,
        cost_usd=Decimal("9.5"),
    )
    settings.LLM_SUBJECT_TOKEN_BUDGET = 1500

    settings.LLM_DAILY_BUDGET_USD = 100
    calm = admin_client.get(URL).content.decode()
    settings.LLM_DAILY_BUDGET_USD = 10
    nearly = admin_client.get(URL).content.decode()
    settings.LLM_DAILY_BUDGET_USD = 9
    spent = admin_client.get(URL).content.decode()

    assert "$90.50 left" in calm and "budget is" not in calm
    assert "nearly spent" in nearly and "$0.50 of $10.00 left" in nearly
    assert "Today's LLM budget is spent" in spent and "$0.00 left" in spent
    # The visit's 1,000 tokens of 1,500, all runs together.
    assert "<td>visit:7</td><td>1,000</td><td>500</td>" in calm
