"""The audit trail: who viewed, took out or changed a visit's PHI, and who signed in or out.

One function writes it, `audit_record`. Where an action comes from (a request's address and
browser, or a command line's `--actor`, `--reason` and OS login) is set once at the edge, by
`AuditOriginMiddleware` or `command_origin`, so the services that record an action need not
pass it along. Rows are never changed (see `AccessEvent`)."""

from __future__ import annotations

import csv
import getpass
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from axes.signals import user_locked_out
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.core.management.base import CommandError, CommandParser
from django.db.models import QuerySet
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse

from pipeline import phi_viewed
from visits.models import VISIT_SUBJECT_PREFIX, AccessEvent, Visit, visit_id_of_subject

if TYPE_CHECKING:
    from django.contrib.auth.models import AnonymousUser, User

Action = AccessEvent.Action

AUDIT_PERMISSION = "visits.view_audit"

# What counts as looking at PHI, for "who viewed visit N".
VIEWING = frozenset(
    {
        Action.VIEW_VISIT,
        Action.VIEW_NOTE,
        Action.VIEW_HISTORY,
        Action.VIEW_ADMIN,
        Action.VIEW_STATUS,
        Action.PLAY_RECORDING,
        Action.EXPORT_FHIR,
        Action.PRINT_SUMMARY,
    }
)


@dataclass(frozen=True)
class Origin:
    """Where the current action comes from: a web request (its address and browser), or a
    command line (the person it names with --actor, why, and the OS login it ran under)."""

    ip: str | None = None
    user_agent: str = ""
    actor: User | None = None  # a command's --actor, when a user has that name
    actor_label: str = ""
    os_user: str = ""
    reason: str = ""

    @property
    def operator_label(self) -> str:
        """How the engine's own operator log names a command's operator."""
        return f"{self.actor_label} (cli:{self.os_user})" if self.actor_label else self.os_user


_origin: ContextVar[Origin | None] = ContextVar("audit_origin", default=None)


def current_origin() -> Origin:
    """The origin set at the edge; outside any (a shell, a test) the OS login."""
    found = _origin.get()
    if found is not None:
        return found
    login = getpass.getuser()
    return Origin(actor_label=f"cli:{login}", os_user=login)


class AuditOriginMiddleware:
    """Make each request's address and browser the origin of what it does."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        token = _origin.set(
            Origin(
                # The peer's address. Behind a reverse proxy it is the proxy's, unless the
                # proxy is configured to pass the client's through (see README, Deploying).
                ip=request.META.get("REMOTE_ADDR") or None,
                user_agent=request.headers.get("User-Agent", "")[:300],
            )
        )
        try:
            return self.get_response(request)
        finally:
            _origin.reset(token)


def command_arguments(parser: CommandParser) -> None:
    """--actor and --reason, with no default: a command that reads or changes PHI says on
    whose behalf and why. The OS login is recorded beside them."""
    parser.add_argument(
        "--actor",
        required=True,
        metavar="NAME",
        help="Who this is done for or by (a username where there is one), for the audit trail.",
    )
    parser.add_argument("--reason", required=True, help="Why, for the audit trail.")


@contextmanager
def command_origin(options: dict[str, Any]) -> Iterator[Origin]:
    """Make a command's --actor and --reason the origin of what it does."""
    actor, reason = options["actor"].strip(), options["reason"].strip()
    if not actor or not reason:
        raise CommandError("--actor and --reason must not be empty: the audit trail needs both.")
    origin = Origin(
        actor=get_user_model().objects.filter(username=actor).first(),
        actor_label=actor[:150],
        os_user=getpass.getuser()[:64],
        reason=reason[:500],
    )
    token = _origin.set(origin)
    try:
        yield origin
    finally:
        _origin.reset(token)


def audit_record(
    action: str,
    *,
    user: User | AnonymousUser | None = None,
    visit: Visit | None = None,
    version: int | None = None,
    run_id: int | None = None,
    reason: str = "",
    refused: str = "",
    detail: str = "",
    label: str = "",
) -> AccessEvent:
    """Record one action: by `user` (signed in), or else by the command's actor or the OS
    login; refused when `refused` says why. `label` names an actor with no user row (the
    name typed at a failed sign-in)."""
    origin = current_origin()
    if user is not None and user.is_authenticated:
        actor: Any = user
        actor_label, os_user, default_reason = user.get_username(), "", ""
    else:  # a command line (its --actor), or nobody signed in
        actor = origin.actor
        actor_label = label or origin.actor_label or "anonymous"
        os_user, default_reason = origin.os_user, origin.reason
    return AccessEvent.objects.create(
        visit=visit,
        action=action,
        note_version=version,
        run_id=run_id,
        actor=actor,
        actor_label=actor_label[:150],
        os_user=os_user,
        reason=(reason or default_reason)[:500],
        outcome=AccessEvent.Outcome.REFUSED if refused else AccessEvent.Outcome.ALLOWED,
        detail=(refused or detail)[:300],
        ip=origin.ip,
        user_agent=origin.user_agent,
    )


def visit_viewers(visit: Visit) -> QuerySet[AccessEvent]:
    """Who viewed visit N (allowed or refused), newest first: one query."""
    return AccessEvent.objects.filter(visit=visit, action__in=VIEWING).select_related("actor")


CSV_COLUMNS = [
    "created_at",
    "actor_label",
    "actor_id",
    "os_user",
    "action",
    "visit_id",
    "note_version",
    "run_id",
    "outcome",
    "reason",
    "detail",
    "ip",
    "user_agent",
]


def audit_csv_write(events: QuerySet[AccessEvent], out: IO[str] | Any) -> None:
    """Write `events` as CSV, one row each, streamed from the database."""
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for row in events.values_list(*CSV_COLUMNS).iterator(chunk_size=2000):
        writer.writerow([_cell(value) for value in row])


def _cell(value: object) -> object:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    # A name typed at a failed sign-in is anyone's text: a leading =, +, - or @ would run as a
    # formula in the privacy officer's spreadsheet, so it is kept as text.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


# --- signing in and out ----------------------------------------------------------------------


@receiver(user_logged_in)
def _logged_in(sender: Any, request: HttpRequest | None, user: User, **_: Any) -> None:
    audit_record(Action.LOGIN, user=user)


@receiver(user_logged_out)
def _logged_out(sender: Any, request: HttpRequest | None, user: User | None, **_: Any) -> None:
    if user is not None:
        audit_record(Action.LOGOUT, user=user, detail=getattr(request, "signed_out_why", ""))


@receiver(user_login_failed)
def _login_failed(
    sender: Any, credentials: dict[str, Any], request: HttpRequest | None = None, **_: Any
) -> None:
    if getattr(request, "axes_locked_out", False):
        return  # django-axes refused it, or this failure locked it out: `_locked_out` says so
    # Django has already masked the password in `credentials`; only the name typed is kept.
    typed = str(credentials.get("username", ""))
    audit_record(
        Action.LOGIN_FAILED, refused="wrong username or password", label=typed or "(no username)"
    )


@receiver(user_locked_out)
def _locked_out(sender: Any, request: HttpRequest, username: str | None, **_: Any) -> None:
    audit_record(
        Action.LOCKOUT,
        refused=f"{settings.AXES_FAILURE_LIMIT} wrong passwords in a row: signing in is paused "
        f"for {int(settings.AXES_COOLOFF_TIME.total_seconds() // 60)} minutes",
        label=username or "(no username)",
    )


@receiver(phi_viewed)
def _engine_phi_viewed(
    sender: Any, request: HttpRequest, subject: str, what: str, **_: Any
) -> None:
    if not subject.startswith(VISIT_SUBJECT_PREFIX):
        return  # another workflow's subject: not a visit
    visit = Visit.objects.filter(pk=visit_id_of_subject(subject)).first()
    audit_record(Action.VIEW_ADMIN, user=request.user, visit=visit, detail=what)
