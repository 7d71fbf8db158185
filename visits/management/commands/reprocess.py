import sys
from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone
from tqdm import tqdm

from pipeline import RunStatus
from visits.management.output import refusals_as_command_errors
from visits.privacy.audit import command_arguments, command_origin
from visits.reprocess import (
    VisitPlan,
    reprocess_execute,
    reprocess_plan,
    visits_for_reprocess,
)
from visits.stages import VISIT_WORKFLOW


class Command(BaseCommand):
    help = (
        "Retry the failed stage of many visits (same run, earlier outputs and answered LLM "
        "calls reused), or with --from-stage re-run them from a stage as new runs."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--visit",
            type=int,
            action="append",
            dest="visits",
            metavar="ID",
            help="A visit to reprocess (repeatable).",
        )
        parser.add_argument(
            "--status",
            choices=RunStatus.values,
            help="Only visits whose current run has this status (usually 'failed').",
        )
        parser.add_argument(
            "--stage",
            choices=VISIT_WORKFLOW.stage_names,
            help="Only visits whose current run failed at this stage.",
        )
        parser.add_argument(
            "--since", metavar="DATE", help="Only visits created on or after DATE (YYYY-MM-DD)."
        )
        parser.add_argument(
            "--from-stage",
            choices=VISIT_WORKFLOW.stage_names,
            help="Fork a new run from this stage instead of retrying the failed one.",
        )
        parser.add_argument(
            "--model",
            metavar="NAME",
            help="With --from-stage: the new runs ask this LLM (it must be in the price "
            "table) instead of LLM_MODEL; a model migration, measured with `compare`.",
        )
        parser.add_argument(
            "--label",
            metavar="L",
            default="",
            help="With --from-stage: name this batch of runs, to compare it later "
            "(`manage.py compare --label L`).",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Print the plan (visits, stages to run, outputs reused, estimated tokens) "
            "and change nothing.",
        )
        parser.add_argument(
            "--inline",
            action="store_true",
            help="Run the pipelines in this process instead of enqueuing them for the cluster.",
        )
        command_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        if not any(options[key] for key in ("visits", "status", "stage", "since")):
            raise CommandError(
                "Choose the visits: --visit ID, --status, --stage or --since (reprocessing "
                "every visit is never a default)."
            )
        if (options["model"] or options["label"]) and not options["from_stage"]:
            raise CommandError(
                "--model and --label make new runs: give --from-stage (e.g. --from-stage "
                "summarize) as well."
            )
        if len(options["label"]) > 64:
            raise CommandError("--label is at most 64 characters.")
        since = _parse_since(options["since"]) if options["since"] else None
        visits = visits_for_reprocess(
            visit_ids=options["visits"],
            status=options["status"],
            failed_stage=options["stage"],
            since=since,
        )
        plans = reprocess_plan(visits, from_stage=options["from_stage"])
        if not plans:
            self.stdout.write("No visits match.")
            return
        self._print_plan(plans)
        if options["dry_run"]:
            return
        # On a terminal, a progress bar on stderr; nothing when the output is piped or logged.
        progress = tqdm(plans, unit="visit", file=sys.stderr, disable=not self.stdout.isatty())
        with command_origin(options), refusals_as_command_errors():
            outcome = reprocess_execute(
                progress,
                from_stage=options["from_stage"],
                reason=options["reason"],
                inline=options["inline"],
                model=options["model"],
                label=options["label"],
            )
        for line in outcome.refused:
            self.stdout.write(self.style.WARNING(f"skipped {line}"))
        self.stdout.write(
            self.style.SUCCESS(
                f"succeeded {outcome.succeeded}, failed {outcome.failed}, "
                f"enqueued {outcome.enqueued}, skipped {len(outcome.refused)}; "
                f"tokens spent {outcome.tokens_spent} (${outcome.cost_usd:.4f}), "
                f"tokens saved by reuse {outcome.tokens_saved} (${outcome.saved_cost_usd:.4f})"
            )
        )

    def _print_plan(self, plans: list[VisitPlan]) -> None:
        total = 0
        for plan in plans:
            if plan.skip_reason:
                self.stdout.write(f"visit {plan.visit.pk}: skip ({plan.skip_reason})")
                continue
            total += plan.estimated_tokens
            self.stdout.write(
                f"visit {plan.visit.pk}: {plan.mode} run {', '.join(plan.runs)}; "
                f"reuse {', '.join(plan.reused) or 'nothing'}; "
                f"~{plan.estimated_tokens} tokens"
            )
        self.stdout.write(
            f"plan: {sum(not p.skip_reason for p in plans)} visit(s), ~{total} tokens estimated"
        )


def _parse_since(value: str) -> datetime:
    """A date (midnight, local time) or a date and time, in ISO 8601."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise CommandError(f"--since {value!r} is not a date; use YYYY-MM-DD.") from None
    return timezone.make_aware(parsed) if timezone.is_naive(parsed) else parsed
