"""mailplatform settings, driven by the environment (see README's configuration table).

With nothing set, everything runs embedded under DATA_DIR: SQLite in WAL mode, a local blob
folder, Kombu's filesystem transport as the Celery broker. DATABASE_URL, CELERY_BROKER_URL
and S3_* switch the same code to PostgreSQL, Redis or RabbitMQ, and an S3 server.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

from mailplatform import config

BASE_DIR = Path(__file__).resolve().parent.parent

DATA_DIR = Path(config.string("DATA_DIR", str(BASE_DIR / "var"))).resolve()
SPOOL_DIR = Path(config.string("SPOOL_DIR", str(DATA_DIR / "spool"))).resolve()
try:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
except OSError as exc:
    raise ImproperlyConfigured(f"DATA_DIR: cannot create {DATA_DIR}: {exc}") from exc

SECRET_KEY = config.persistent_secret("SECRET_KEY", DATA_DIR)
# API keys are hashed with their own pepper so that rotating SECRET_KEY (sessions, signed
# URLs) does not invalidate every key, and a leaked SECRET_KEY does not expose key hashes.
API_KEY_PEPPER = config.persistent_secret("API_KEY_PEPPER", DATA_DIR)
# Fernet key for connector passwords and OAuth tokens at rest.
FIELD_ENCRYPTION_KEY = config.persistent_secret(
    "FIELD_ENCRYPTION_KEY",
    DATA_DIR,
    generate=lambda: base64.urlsafe_b64encode(os.urandom(32)).decode(),
)

DEBUG = config.boolean("DEBUG", False)

BASE_URL = config.url("BASE_URL", "http://127.0.0.1:8000", schemes={"http", "https"}).rstrip("/")
_base_host = urlsplit(BASE_URL).hostname or "127.0.0.1"
# What names the platform in mail (MX host, sender): BASE_URL's host, or mailplatform.localhost
# when that is an IP or localhost (no mail domain).
_mail_domain = config.mail_domain(_base_host)
ALLOWED_HOSTS = config.csv("ALLOWED_HOSTS", sorted({"127.0.0.1", "localhost", "[::1]", _base_host}))
CSRF_TRUSTED_ORIGINS = [BASE_URL]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_prometheus",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's files, served by us (no CDN)
    "django_celery_beat",
    "allauth",
    "allauth.account",
    "audit",
    "tenants",
    "mailboxes",
    "ingest",
    "outbound",
    "webhooks",
    "webinbox",
    "mailaccess",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "mailplatform.unavailable.DatabaseUnavailableMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "webinbox.middleware.ContentSecurityPolicyMiddleware",
    "mailplatform.streams.StaticFilesMiddleware",  # whitenoise, streaming under ASGI
    "audit.middleware.RequestContextMiddleware",
    "tenants.middleware.StaffIpAllowlistMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "webinbox.middleware.SessionGenerationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "allauth.account.middleware.AccountMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "mailplatform.urls"
WSGI_APPLICATION = "mailplatform.wsgi.application"
ASGI_APPLICATION = "mailplatform.asgi.application"

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

# --- Database -----------------------------------------------------------------------------
# The web server pools its PostgreSQL connections (DATABASE_POOL, applied by asgi.py
# through mailplatform/database.py, which says why); at most DATABASE_POOL_MAX
# sessions per web process, and a request that finds none free within DATABASE_POOL_TIMEOUT
# seconds answers 503. Every other process keeps DATABASE_CONN_MAX_AGE connections.
DATABASE_POOL = config.boolean("DATABASE_POOL", True)
DATABASE_POOL_MIN = config.integer("DATABASE_POOL_MIN", 2, minimum=0, maximum=100)
DATABASE_POOL_MAX = config.integer("DATABASE_POOL_MAX", 10, minimum=1, maximum=100)
DATABASE_POOL_TIMEOUT = config.integer("DATABASE_POOL_TIMEOUT", 10, minimum=1, maximum=300)
if DATABASE_POOL_MIN > DATABASE_POOL_MAX:
    raise ImproperlyConfigured("DATABASE_POOL_MIN: must not exceed DATABASE_POOL_MAX")
# DATABASE_URL names a pgbouncer in transaction mode (or another transaction pooler).
DATABASE_TRANSACTION_POOLING = config.boolean("DATABASE_TRANSACTION_POOLING", False)
_database = config.database("DATABASE_URL", f"sqlite:///{DATA_DIR / 'mailplatform.sqlite3'}")
if _database["ENGINE"] == "django.db.backends.sqlite3":
    _database["OPTIONS"] = {
        # WAL lets readers run beside the one writer; IMMEDIATE takes the write lock at BEGIN
        # so two writers queue on busy_timeout instead of failing with "database is locked".
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }
else:
    _database["ENGINE"] = "django_prometheus.db.backends.postgresql"
    _database["CONN_MAX_AGE"] = config.integer("DATABASE_CONN_MAX_AGE", 60, minimum=0)
    _database["CONN_HEALTH_CHECKS"] = True
    _database["OPTIONS"] = {
        "connect_timeout": 5,
        # JIT compilation costs 150-250 ms on exactly the large search plans it fires for
        # (bench/search.py) and pays off only for long analytic queries, which we do not run.
        # A transaction pooler does not pass startup options on: there, set it on the role or
        # the database instead (docs/scaling.md).
        **({} if DATABASE_TRANSACTION_POOLING else {"options": "-c jit=off"}),
        **dict(_database.get("OPTIONS") or {}),  # type: ignore[call-overload]
    }
    # A named cursor lives in its server session; behind a transaction pooler the next
    # FETCH may land on another one (Django's "Transaction pooling and server-side cursors").
    _database["DISABLE_SERVER_SIDE_CURSORS"] = DATABASE_TRANSACTION_POOLING
DATABASES = {"default": _database}
# LISTEN holds a session, so the waiters' one listening connection per web process goes
# straight to PostgreSQL when DATABASE_URL names a transaction pooler (docs/scaling.md).
DATABASE_SESSION: dict[str, object] | None = None
if config.raw("DATABASE_SESSION_URL"):
    DATABASE_SESSION = config.database("DATABASE_SESSION_URL", "")
    if DATABASE_SESSION["ENGINE"] == "django.db.backends.sqlite3":
        raise ImproperlyConfigured("DATABASE_SESSION_URL: must name the PostgreSQL server behind DATABASE_URL")
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_USER_MODEL = "tenants.User"
AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "allauth.account.auth_backends.AuthenticationBackend",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# --- Blob storage ----------------------------------------------------------------------
S3_BUCKET = config.string("S3_BUCKET", "")
S3_ENDPOINT_URL = config.string("S3_ENDPOINT_URL", "")
if S3_ENDPOINT_URL:
    config.url("S3_ENDPOINT_URL", S3_ENDPOINT_URL, schemes={"http", "https"})
SIGNED_URL_TTL = config.integer("SIGNED_URL_TTL", 300, minimum=60, maximum=600)
BLOB_DIR = DATA_DIR / "blobs"
if S3_BUCKET:
    _blobs: dict[str, object] = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": S3_BUCKET,
            "endpoint_url": S3_ENDPOINT_URL or None,
            "access_key": config.string("S3_ACCESS_KEY_ID", "") or None,
            "secret_key": config.string("S3_SECRET_ACCESS_KEY", "") or None,
            "region_name": config.string("S3_REGION", "us-east-1"),
            "addressing_style": "path",
            "signature_version": "s3v4",
            "default_acl": None,
            "querystring_auth": True,
            "querystring_expire": SIGNED_URL_TTL,
            "file_overwrite": True,
        },
    }
else:
    _blobs = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(BLOB_DIR), "directory_permissions_mode": 0o700, "file_permissions_mode": 0o600},
    }
STORAGES = {
    "default": _blobs,
    "blobs": _blobs,
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

STATIC_URL = "static/"
# collectstatic's target; the container image sets it outside DATA_DIR (collected at build).
STATIC_ROOT = Path(config.string("STATIC_ROOT", str(DATA_DIR / "static"))).resolve()
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
STATICFILES_DIRS = [BASE_DIR / "static"]
WHITENOISE_USE_FINDERS = True

# --- Celery ----------------------------------------------------------------------------
CELERY_BROKER_URL = config.url(
    "CELERY_BROKER_URL",
    "filesystem://localhost/",  # a hostname, or kombu warns it falls back to localhost
    schemes={"filesystem", "redis", "rediss", "amqp", "amqps", "pyamqp"},
)
if CELERY_BROKER_URL.startswith("filesystem://"):
    _broker_dir = DATA_DIR / "broker"
    (_broker_dir / "queue").mkdir(parents=True, exist_ok=True)
    (_broker_dir / "processed").mkdir(parents=True, exist_ok=True)
    (_broker_dir / "control").mkdir(parents=True, exist_ok=True)
    # kombu's filesystem transport with each message written whole before a worker can see it.
    CELERY_BROKER_TRANSPORT = "mailplatform.brokers:Transport"
    CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        # Exchange bindings; kombu's default is ./control, in whatever the working directory is.
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
        # How long a worker sleeps when it finds nothing it may take. kombu's default, 1 s, is
        # also slept whenever the worker's prefetch is full: a worker took about one short
        # task a second per pool slot, and a burst of mail left webhooks queued for minutes.
        # An idle poll is one listdir of an empty folder.
        "polling_interval": 0.05,
    }
else:
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
CELERY_BROKER_CONNECTION_TIMEOUT = 5
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SOFT_TIME_LIMIT = 60
CELERY_TASK_TIME_LIMIT = 90
CELERY_TASK_DEFAULT_QUEUE = "maintenance"
# Celery's Django fixup closes every database connection before and after each task unless
# this is set, so each task paid for a new PostgreSQL backend. Connections are recycled by
# CONN_MAX_AGE and health-checked instead (mailplatform.celery, task_prerun/task_postrun).
CELERY_DB_REUSE_MAX = 1_000_000
CELERY_TASK_ROUTES = {
    "ingest.tasks.*": {"queue": "ingest"},
    "mailboxes.tasks.message_parse": {"queue": "parse"},
    "mailboxes.tasks.messages_parse": {"queue": "parse"},
    "mailboxes.tasks.message_index": {"queue": "index"},
    "webhooks.tasks.*": {"queue": "webhooks"},
    "outbound.tasks.*": {"queue": "outbound"},
}
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_TIMEZONE = "UTC"

# --- Mail ------------------------------------------------------------------------------
SMTP_HOST = config.string("SMTP_HOST", "127.0.0.1")
SMTP_PORT = config.integer("SMTP_PORT", 2525, minimum=1, maximum=65535)
# Ingest (ingest/): limits, timeouts, TLS, PROXY protocol, processes and metrics of runsmtp.
# 0 disables a rate or connection limit. See docs/benchmarks.md for the process model.
SMTP_HOSTNAME = config.string("SMTP_HOSTNAME", urlsplit(BASE_URL).hostname or "localhost")
INGEST_MAX_MESSAGE_SIZE = config.integer("INGEST_MAX_MESSAGE_SIZE", 25 * 1024 * 1024, minimum=1024)
INGEST_MAX_RECIPIENTS = config.integer("INGEST_MAX_RECIPIENTS", 100, minimum=1)
INGEST_MAX_CONNECTIONS_PER_IP = config.integer("INGEST_MAX_CONNECTIONS_PER_IP", 50, minimum=0)
INGEST_RATE_PER_IP = config.integer("INGEST_RATE_PER_IP", 600, minimum=0)  # messages a minute
INGEST_RATE_PER_TENANT = config.integer("INGEST_RATE_PER_TENANT", 6000, minimum=0)  # messages a minute
INGEST_COMMAND_TIMEOUT = config.integer("INGEST_COMMAND_TIMEOUT", 300, minimum=1)  # RFC 5321 4.5.3.2
INGEST_CONNECTION_DEADLINE = config.integer("INGEST_CONNECTION_DEADLINE", 1800, minimum=1)
INGEST_SPOOL_LOW_WATER = config.integer("INGEST_SPOOL_LOW_WATER", 256 * 1024 * 1024, minimum=0)  # bytes free
INGEST_DIRECTORY_REFRESH = config.integer("INGEST_DIRECTORY_REFRESH", 2, minimum=1, maximum=60)  # seconds
# A miss in the directory's snapshot is asked of the database before any refusal: at most this
# many look-ups at once per process, each within this many seconds (else 451 4.3.0), and a
# refusal is remembered this long (seconds, 0: never) or until the snapshot changes.
INGEST_DIRECTORY_LOOKUPS = config.integer("INGEST_DIRECTORY_LOOKUPS", 8, minimum=1, maximum=256)
INGEST_DIRECTORY_LOOKUP_TIMEOUT = config.integer("INGEST_DIRECTORY_LOOKUP_TIMEOUT", 5, minimum=1, maximum=60)
INGEST_DIRECTORY_NEGATIVE_TTL = config.integer("INGEST_DIRECTORY_NEGATIVE_TTL", 1, minimum=0, maximum=60)
INGEST_WORKERS = config.integer("INGEST_WORKERS", min(os.cpu_count() or 1, 4), minimum=1, maximum=64)
INGEST_DRAIN = config.boolean("INGEST_DRAIN", True)
INGEST_DRAIN_THREADS = config.integer("INGEST_DRAIN_THREADS", 4, minimum=1, maximum=64)
INGEST_METRICS_PORT = config.integer("INGEST_METRICS_PORT", 9125, minimum=0, maximum=65535)
SMTP_TLS_CERT_FILE = config.string("SMTP_TLS_CERT_FILE", "")
SMTP_TLS_KEY_FILE = config.string("SMTP_TLS_KEY_FILE", "")
if bool(SMTP_TLS_CERT_FILE) != bool(SMTP_TLS_KEY_FILE):
    raise ImproperlyConfigured("SMTP_TLS_CERT_FILE and SMTP_TLS_KEY_FILE: set both or neither")
SMTP_PROXY_PROTOCOL = config.boolean("SMTP_PROXY_PROTOCOL", False)
# The balancers whose PROXY header is believed (IPs/CIDRs); required with SMTP_PROXY_PROTOCOL:
# any other peer is disconnected before the greeting (HAProxy's PROXY protocol spec, section 2).
SMTP_TRUSTED_PROXIES = config.cidrs("SMTP_TRUSTED_PROXIES", [])
if SMTP_PROXY_PROTOCOL and not SMTP_TRUSTED_PROXIES:
    raise ImproperlyConfigured("SMTP_TRUSTED_PROXIES: required when SMTP_PROXY_PROTOCOL is true (the balancers' IPs)")
# Antivirus (mailplatform/clamd.py): clamd's INSTREAM at CLAMD_URL (tcp://host:port or
# unix:///path; empty: no scanning). CLAMD_STREAM_MAX_LENGTH must match clamd's StreamMaxLength
# (larger messages are "too_large", never clean). ANTIVIRUS_MODE is the mode of tenants and
# domains that set none (off, tag, quarantine, reject); ANTIVIRUS_FAIL_OPEN: with clamd down,
# accept and rescan later instead of 451 (reject) or holding the message (quarantine).
CLAMD_URL = config.string("CLAMD_URL", "")
if CLAMD_URL:
    from mailplatform.clamd import ClamdUrlInvalid, address_parse

    try:
        address_parse(CLAMD_URL)
    except ClamdUrlInvalid as exc:
        raise ImproperlyConfigured(f"CLAMD_URL: {exc}") from None
CLAMD_TIMEOUT = config.integer("CLAMD_TIMEOUT", 30, minimum=1, maximum=600)
CLAMD_STREAM_MAX_LENGTH = config.integer("CLAMD_STREAM_MAX_LENGTH", 25 * 1024 * 1024, minimum=1024)
ANTIVIRUS_MODE = config.string("ANTIVIRUS_MODE", "tag")
if ANTIVIRUS_MODE not in {"off", "tag", "quarantine", "reject"}:
    raise ImproperlyConfigured(f"ANTIVIRUS_MODE: expected off, tag, quarantine or reject, got {ANTIVIRUS_MODE!r}")
ANTIVIRUS_FAIL_OPEN = config.boolean("ANTIVIRUS_FAIL_OPEN", False)
# Seconds a transaction in DATA may take to finish after SIGTERM (idle sessions get 421 at once).
INGEST_SHUTDOWN_GRACE = config.integer("INGEST_SHUTDOWN_GRACE", 5, minimum=0, maximum=300)
# Unset: outgoing mail (sign-in links) is written one file a message into DATA_DIR/outbox, a
# private folder; never to the terminal, whose output ends up in logs.
_email = config.email("EMAIL_URL", "filemail://")
EMAIL_BACKEND = str(_email["EMAIL_BACKEND"])
EMAIL_HOST = str(_email.get("EMAIL_HOST") or "")
EMAIL_PORT = int(str(_email.get("EMAIL_PORT") or 25))
EMAIL_HOST_USER = str(_email.get("EMAIL_HOST_USER") or "")
EMAIL_HOST_PASSWORD = str(_email.get("EMAIL_HOST_PASSWORD") or "")
EMAIL_USE_TLS = bool(_email.get("EMAIL_USE_TLS"))
EMAIL_USE_SSL = bool(_email.get("EMAIL_USE_SSL"))
EMAIL_FILE_PATH = str(_email.get("EMAIL_FILE_PATH") or DATA_DIR / "outbox")
if EMAIL_BACKEND == "django.core.mail.backends.filebased.EmailBackend":
    Path(EMAIL_FILE_PATH).mkdir(parents=True, exist_ok=True, mode=0o700)
EMAIL_TIMEOUT = 10
DEFAULT_FROM_EMAIL = config.string("DEFAULT_FROM_EMAIL", f"mailplatform <noreply@{_mail_domain}>")
SERVER_EMAIL = DEFAULT_FROM_EMAIL

# Domain under which temporary inboxes and the demo tenant receive mail.
TEMP_INBOX_DOMAIN = config.string("TEMP_INBOX_DOMAIN", "tmp.mailplatform.localhost").lower()
DEMO_DOMAIN = config.string("DEMO_DOMAIN", "demo.mailplatform.localhost").lower()
DEMO_USER_EMAIL = config.string("DEMO_USER_EMAIL", "demo@mailplatform.localhost").lower()
# The hosts that custom domains point their MX records at.
MX_HOSTS = [host.rstrip(".").lower() for host in config.csv("MX_HOSTS", [f"mx.{_mail_domain}"])]
# Domain checks: resolvers as host[:port] (empty: the system's), timeout, how often every
# domain is re-checked, and how long an MX may be lost before the domain is suspended.
DNS_RESOLVERS = config.host_ports("DNS_RESOLVERS", default_port=53)
DNS_TIMEOUT = config.integer("DNS_TIMEOUT", 5, minimum=1, maximum=30)
# Trust verdicts (mailboxes/authentication.py): SPF, DKIM, DMARC and ARC verified in the parse
# step through the same resolvers; each look-up within AUTH_DNS_TIMEOUT seconds, answers kept
# per process at most AUTH_DNS_CACHE_TTL seconds (and never past their own TTL).
AUTH_VERIFY = config.boolean("AUTH_VERIFY", True)
AUTH_DNS_TIMEOUT = config.integer("AUTH_DNS_TIMEOUT", 3, minimum=1, maximum=30)
AUTH_DNS_CACHE_TTL = config.integer("AUTH_DNS_CACHE_TTL", 60, minimum=0, maximum=3600)
DOMAIN_CHECK_INTERVAL = config.integer("DOMAIN_CHECK_INTERVAL", 900, minimum=1)
DOMAIN_MX_GRACE = config.integer("DOMAIN_MX_GRACE", 48 * 3600, minimum=0)
# How often beat looks for due domains (seconds), and the failure streak that suspends a
# claimed domain: this many consecutive failed checks spanning at least this many seconds.
DOMAIN_CHECK_SWEEP = config.integer("DOMAIN_CHECK_SWEEP", 60, minimum=1)
DOMAIN_FAILURE_STREAK = config.integer("DOMAIN_FAILURE_STREAK", 3, minimum=2)
DOMAIN_FAILURE_PERIOD = config.integer("DOMAIN_FAILURE_PERIOD", 3600, minimum=0)
# Plans whose tenants may receive mail for domains that are not verified yet (test domains).
UNVERIFIED_DOMAIN_PLANS = set(config.csv("UNVERIFIED_DOMAIN_PLANS", []))

# Outbound calls to hosts a tenant names (mailplatform/transport.py): SSO providers, and
# webhooks unless their own WEBHOOK_* settings say otherwise. OUTBOUND_ALLOW_PRIVATE
# (development and tests only) lets them reach loopback and private addresses on any port;
# WEBHOOK_ALLOW_PRIVATE, the contract's name, is its alias: either one alone sets both.
OUTBOUND_ALLOW_PRIVATE = config.boolean("OUTBOUND_ALLOW_PRIVATE", config.boolean("WEBHOOK_ALLOW_PRIVATE", False))
OUTBOUND_ALLOW_HTTP = config.boolean("OUTBOUND_ALLOW_HTTP", OUTBOUND_ALLOW_PRIVATE)
try:
    OUTBOUND_EXTRA_PORTS = [int(port) for port in config.csv("OUTBOUND_EXTRA_PORTS", [])]
except ValueError as exc:
    raise ImproperlyConfigured(f"OUTBOUND_EXTRA_PORTS: expected port numbers: {exc}") from exc
OUTBOUND_CA_FILE = config.string("OUTBOUND_CA_FILE", "")

WEBHOOK_ALLOW_PRIVATE = config.boolean("WEBHOOK_ALLOW_PRIVATE", OUTBOUND_ALLOW_PRIVATE)
# Webhooks (webhooks/): plain http only where allowed (defaults to WEBHOOK_ALLOW_PRIVATE),
# extra destination ports besides 80/443, per-request timeout, rotation overlap, retry and
# disabling policy, claim lease, replay pacing.
WEBHOOK_ALLOW_HTTP = config.boolean("WEBHOOK_ALLOW_HTTP", WEBHOOK_ALLOW_PRIVATE)
try:
    WEBHOOK_EXTRA_PORTS = [
        int(port) for port in config.csv("WEBHOOK_EXTRA_PORTS", [str(port) for port in OUTBOUND_EXTRA_PORTS])
    ]
except ValueError as exc:
    raise ImproperlyConfigured(f"WEBHOOK_EXTRA_PORTS: expected port numbers: {exc}") from exc
WEBHOOK_CA_FILE = config.string("WEBHOOK_CA_FILE", OUTBOUND_CA_FILE)
# A send task (webhooks.tasks.deliveries_send) makes its attempts within WEBHOOK_SEND_WINDOW
# (a batch's in parallel, a replay's chain one after the other: webhooks.delivery.REPLAY_CHAIN
# fits them in), and records them before its hard limit.
WEBHOOK_SEND_WINDOW = 60
WEBHOOK_TIMEOUT = config.integer("WEBHOOK_TIMEOUT", 15, minimum=1, maximum=WEBHOOK_SEND_WINDOW)
WEBHOOK_SECRET_OVERLAP = config.integer("WEBHOOK_SECRET_OVERLAP", 24 * 3600, minimum=0)
WEBHOOK_DISABLE_AFTER = config.integer("WEBHOOK_DISABLE_AFTER", 5 * 24 * 3600, minimum=60)
WEBHOOK_TASK_SOFT_TIME_LIMIT = WEBHOOK_SEND_WINDOW + 15
WEBHOOK_TASK_TIME_LIMIT = WEBHOOK_TASK_SOFT_TIME_LIMIT + 15
# A claim's lease outlasts the task that holds it: a slow attempt is never handed out again
# while its task may still be sending it; after the hard limit, the dispatcher takes it back.
WEBHOOK_LEASE = config.integer("WEBHOOK_LEASE", WEBHOOK_TASK_TIME_LIMIT + 30, minimum=WEBHOOK_TASK_TIME_LIMIT + 1)
WEBHOOK_REPLAY_RATE = config.integer("WEBHOOK_REPLAY_RATE", 50, minimum=1)
WEBHOOK_REPLAY_MAX = config.integer("WEBHOOK_REPLAY_MAX", 10000, minimum=1)

# --- API -------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["tenants.api.authentication.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["tenants.api.permissions.KeyPermission"],
    "DEFAULT_PARSER_CLASSES": ["mailplatform.api.BoundedJSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PAGINATION_CLASS": "mailplatform.pagination.CreatedCursorPagination",
    "DEFAULT_SCHEMA_CLASS": "mailplatform.schema.PermissionAutoSchema",
    "EXCEPTION_HANDLER": "mailplatform.api.exception_handler",
    "UNAUTHENTICATED_USER": None,
    "PAGE_SIZE": 50,
    "DEFAULT_THROTTLE_RATES": {"temp_inbox": "10/hour"},
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
    # The API speaks JSON only; "format" is free for our own parameters (audit export).
    "URL_FORMAT_OVERRIDE": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "mailplatform API",
    "DESCRIPTION": (
        "Inbound mail as data. Authenticate with `Authorization: Bearer mp_...`. "
        "Each operation names the key permission it needs; objects outside the key's "
        "tenant or resource allow-list answer 404."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "SCHEMA_PATH_PREFIX": r"/api/v1",
    # Error answers on every operation, and the long-polling endpoints (mailplatform/schema.py).
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "mailplatform.schema.error_responses_hook",
    ],
    # The documentation page loads Swagger UI from our own static files, not a CDN: it works
    # offline and its Content-Security-Policy allows only 'self'.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Several models have a "state" (or "policy") field; name each enum after its model, and
    # each choice set shared by several fields once.
    "ENUM_NAME_OVERRIDES": {
        "DomainStateEnum": "tenants.models.Domain.State",
        "MessageStateEnum": "mailboxes.models.Message.State",
        "DeliveryStateEnum": "webhooks.models.Delivery.State",
        "ConnectorStateEnum": "ingest.models.Connector.State",
        "DkimKeyStateEnum": "outbound.models.DkimKey.State",
        "RecipientStateEnum": "outbound.models.Recipient.State",
        "MailboxPoolPolicyEnum": "mailboxes.models.MailboxPool.Policy",
        "AntivirusModeEnum": "tenants.models.AntivirusMode",
        "AntivirusModeSettingEnum": ["", "off", "tag", "quarantine", "reject"],  # "": inherit
        "AlignmentModeEnum": ["r", "s"],
    },
}
API_KEY_LAST_USED_RESOLUTION = 60  # seconds; last_used_at is written at most this often
# Threads (each with one database connection) doing the long-poll waiters' queries, per web
# process (mailboxes/waiting.py); 0 uses Django's one thread-sensitive thread (in-process tests).
WAITING_DB_THREADS = config.integer("WAITING_DB_THREADS", 4, minimum=0, maximum=32)
METRICS_TOKEN = config.string("METRICS_TOKEN", "")
# Every process of a node (web, Celery workers, beat, runsmtp's drainer) writes its metrics
# into this one folder (prometheus_client's multiprocess mode), and the web's /metrics adds
# them up: the workers' counters reach the one place that is scraped. Empty: each process
# keeps its own in memory (only what the web process itself counts reaches /metrics).
_metrics_dir = config.raw("METRICS_DIR")
METRICS_DIR = (
    (os.environ.get("PROMETHEUS_MULTIPROC_DIR") or str(DATA_DIR / "metrics")) if _metrics_dir is None else _metrics_dir
)
if METRICS_DIR:
    from mailplatform.metrics import multiprocess_enable

    multiprocess_enable(METRICS_DIR)
# Outbound mail (outbound/): OUTBOUND_URL names a smarthost (smtp://, smtp+tls:// for STARTTLS,
# smtps://, with user:password@); empty sends straight to each recipient's MX (port
# OUTBOUND_MX_PORT, STARTTLS when offered). DSNs come back to bounces+<id>@OUTBOUND_BOUNCE_DOMAIN.
OUTBOUND_URL = config.string("OUTBOUND_URL", "")
OUTBOUND_BOUNCE_DOMAIN = config.string("OUTBOUND_BOUNCE_DOMAIN", f"bounces.{_mail_domain}").lower()
OUTBOUND_MX_PORT = config.integer("OUTBOUND_MX_PORT", 25, minimum=1, maximum=65535)
OUTBOUND_SMTP_TIMEOUT = config.integer("OUTBOUND_SMTP_TIMEOUT", 60, minimum=1, maximum=600)
# RFC 5321 section 4.5.4.1: retry at growing intervals (seconds), give up after some days.
OUTBOUND_RETRY_SCHEDULE = [
    int(value) for value in config.csv("OUTBOUND_RETRY_SCHEDULE", ["300", "900", "1800", "3600", "7200", "14400"])
]
OUTBOUND_GIVE_UP_AFTER = config.integer("OUTBOUND_GIVE_UP_AFTER", 5 * 24 * 3600, minimum=60)
OUTBOUND_CLAIM_LEASE = config.integer("OUTBOUND_CLAIM_LEASE", 300, minimum=5)
OUTBOUND_RATE_PER_TENANT = config.integer("OUTBOUND_RATE_PER_TENANT", 6000, minimum=1)  # messages a minute
OUTBOUND_DAILY_QUOTA = config.integer("OUTBOUND_DAILY_QUOTA", 50_000, minimum=1)  # recipients a day
OUTBOUND_MAX_RECIPIENTS = config.integer("OUTBOUND_MAX_RECIPIENTS", 100, minimum=1)
# Recipients one delivery task claims (its message's, then others due); seconds a pooled SMTP
# session to the smarthost may stay idle before it is closed.
OUTBOUND_BATCH = config.integer("OUTBOUND_BATCH", 20, minimum=1, maximum=1000)
OUTBOUND_SMTP_IDLE = config.integer("OUTBOUND_SMTP_IDLE", 30, minimum=1, maximum=3600)
# SMTP submission (RFC 6409): STARTTLS required before AUTH; a certificate of its own or SMTP_TLS_*.
SUBMISSION_HOST = config.string("SUBMISSION_HOST", "127.0.0.1")
SUBMISSION_PORT = config.integer("SUBMISSION_PORT", 587, minimum=1, maximum=65535)
# Idempotency-Key of raw uploads: how long (seconds) a key and its first answer are kept.
IDEMPOTENCY_KEY_TTL = config.integer("IDEMPOTENCY_KEY_TTL", 24 * 3600, minimum=60)
# Mail flow in /readyz and /metrics: SMTP nodes, workers and connector runners beat every
# HEARTBEAT_INTERVAL seconds and are stale after HEARTBEAT_STALE_AFTER; the flow is degraded
# when a spool entry or a stored (unparsed) message is older than these many seconds.
HEARTBEAT_INTERVAL = config.integer("HEARTBEAT_INTERVAL", 15, minimum=1, maximum=3600)
HEARTBEAT_STALE_AFTER = config.integer("HEARTBEAT_STALE_AFTER", 60, minimum=1)
MAIL_FLOW_SPOOL_MAX_AGE = config.integer("MAIL_FLOW_SPOOL_MAX_AGE", 300, minimum=1)
MAIL_FLOW_UNPARSED_MAX_AGE = config.integer("MAIL_FLOW_UNPARSED_MAX_AGE", 300, minimum=1)
# IMAP pull connectors (ingest/imap/, runconnectors). CONNECTOR_ALLOW_INSECURE (development and
# tests only) lets a connector reach loopback and private addresses and log in without TLS.
# A first connect takes the newest IMAP_INITIAL_WINDOW messages of each folder; IDLE is
# re-issued every CONNECTOR_IDLE_SECONDS (RFC 2177: before 29 minutes); servers without IDLE
# are polled every CONNECTOR_POLL_INTERVAL; reconnects back off (full jitter) up to
# CONNECTOR_BACKOFF_MAX; a runner holds at most CONNECTOR_CAPACITY accounts, each under a
# lease of CONNECTOR_LEASE_SECONDS, and spreads its first connects over CONNECTOR_STARTUP_STAGGER.
# Messages larger than INGEST_MAX_MESSAGE_SIZE are skipped; CONNECTOR_TIMEOUT bounds each command.
CONNECTOR_ALLOW_INSECURE = config.boolean("CONNECTOR_ALLOW_INSECURE", False)
IMAP_INITIAL_WINDOW = config.integer("IMAP_INITIAL_WINDOW", 50, minimum=0, maximum=100000)
CONNECTOR_IDLE_SECONDS = config.integer("CONNECTOR_IDLE_SECONDS", 25 * 60, minimum=1, maximum=29 * 60)
CONNECTOR_POLL_INTERVAL = config.integer("CONNECTOR_POLL_INTERVAL", 60, minimum=1, maximum=86400)
CONNECTOR_BACKOFF_MAX = config.integer("CONNECTOR_BACKOFF_MAX", 300, minimum=1, maximum=86400)
CONNECTOR_CAPACITY = config.integer("CONNECTOR_CAPACITY", 2000, minimum=1, maximum=100000)
CONNECTOR_LEASE_SECONDS = config.integer("CONNECTOR_LEASE_SECONDS", 60, minimum=2, maximum=3600)
CONNECTOR_STARTUP_STAGGER = config.integer("CONNECTOR_STARTUP_STAGGER", 10, minimum=0, maximum=3600)
CONNECTOR_TIMEOUT = config.integer("CONNECTOR_TIMEOUT", 30, minimum=1, maximum=600)
# Reverse proxies whose X-Forwarded-For is believed (CIDRs); the client IP is the socket's otherwise.
# The only place that decides: uvicorn runs with --no-proxy-headers (scripts/run.py, Dockerfile).
TRUSTED_PROXIES = config.cidrs("TRUSTED_PROXIES", [])
# Per-IP rate limits count an IPv6 client by its network of this many bits (mailplatform/clientip.py).
RATE_LIMIT_IPV6_PREFIX = config.integer("RATE_LIMIT_IPV6_PREFIX", 64, minimum=32, maximum=128)
# Timeout of every call to a tenant's OpenID provider (discovery, token, JWKS, userinfo), the
# whole exchange, and the largest answer taken from it.
SSO_HTTP_TIMEOUT = config.integer("SSO_HTTP_TIMEOUT", 5, minimum=1, maximum=30)
SSO_DOCUMENT_LIMIT = config.integer("SSO_DOCUMENT_LIMIT", 256 * 1024, minimum=4096, maximum=4 * 1024 * 1024)
# Who may reach the Django admin (CIDRs; empty: anywhere).
STAFF_IP_ALLOWLIST = config.cidrs("STAFF_IP_ALLOWLIST", [])

# --- IMAP and POP3 over the stored mail (mailaccess/: runimap, runpop3) ----------------
IMAP_HOST = config.string("IMAP_HOST", "127.0.0.1")
IMAP_PORT = config.integer("IMAP_PORT", 1143, minimum=1, maximum=65535)
IMAPS_PORT = config.integer("IMAPS_PORT", 0, minimum=0, maximum=65535)  # implicit TLS; 0: off
POP3_HOST = config.string("POP3_HOST", "127.0.0.1")
POP3_PORT = config.integer("POP3_PORT", 1110, minimum=1, maximum=65535)
POP3S_PORT = config.integer("POP3S_PORT", 0, minimum=0, maximum=65535)
# The certificate of STARTTLS/STLS and the implicit-TLS ports: SMTP's unless set.
MAILACCESS_TLS_CERT_FILE = config.string("MAILACCESS_TLS_CERT_FILE", "") or SMTP_TLS_CERT_FILE
MAILACCESS_TLS_KEY_FILE = config.string("MAILACCESS_TLS_KEY_FILE", "") or SMTP_TLS_KEY_FILE
# Passwords over plaintext only from loopback, unless this development setting says otherwise.
MAILACCESS_ALLOW_PLAINTEXT = config.boolean("MAILACCESS_ALLOW_PLAINTEXT", False)
# Failed logins per client IP and per address in a sliding window: past it, logins are refused.
MAILACCESS_LOGIN_FAILURES = config.integer("MAILACCESS_LOGIN_FAILURES", 10, minimum=1)
MAILACCESS_LOGIN_WINDOW = config.integer("MAILACCESS_LOGIN_WINDOW", 900, minimum=10)
MAILACCESS_MAX_CONNECTIONS_PER_IP = config.integer("MAILACCESS_MAX_CONNECTIONS_PER_IP", 200, minimum=1)
MAILACCESS_MAX_CONNECTIONS_PER_KEY = config.integer("MAILACCESS_MAX_CONNECTIONS_PER_KEY", 500, minimum=1)
MAILACCESS_MAX_FOLDERS = config.integer("MAILACCESS_MAX_FOLDERS", 1000, minimum=1)
MAILACCESS_IDLE_TIMEOUT = config.integer("MAILACCESS_IDLE_TIMEOUT", 1800, minimum=60)  # RFC 3501 5.4: 30 min
MAILACCESS_METRICS_PORT = config.integer("MAILACCESS_METRICS_PORT", 0, minimum=0, maximum=65535)
# Behind a TCP balancer: a PROXY header first, believed only from these balancers (SMTP's unless set).
MAILACCESS_PROXY_PROTOCOL = config.boolean("MAILACCESS_PROXY_PROTOCOL", False)
MAILACCESS_TRUSTED_PROXIES = config.cidrs("MAILACCESS_TRUSTED_PROXIES", []) or SMTP_TRUSTED_PROXIES
if MAILACCESS_PROXY_PROTOCOL and not MAILACCESS_TRUSTED_PROXIES:
    raise ImproperlyConfigured("MAILACCESS_TRUSTED_PROXIES: required when MAILACCESS_PROXY_PROTOCOL is true")

# --- Accounts (django-allauth) -------------------------------------------------------
ACCOUNT_LOGIN_METHODS = {"email"}
ACCOUNT_SIGNUP_FIELDS = ["email*"]
ACCOUNT_USER_MODEL_USERNAME_FIELD = None
ACCOUNT_EMAIL_VERIFICATION = "none"
ACCOUNT_UNIQUE_EMAIL = True
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/inbox/"
LOGIN_LINK_TTL = 600
# Sign-in link requests: per address and per client IP, in a window of LOGIN_RATE_WINDOW seconds.
LOGIN_RATE_PER_ADDRESS = config.integer("LOGIN_RATE_PER_ADDRESS", 5, minimum=1)
LOGIN_RATE_PER_IP = config.integer("LOGIN_RATE_PER_IP", 30, minimum=1)
LOGIN_RATE_WINDOW = config.integer("LOGIN_RATE_WINDOW", 900, minimum=1)
# Admin (password) sign-in: after this many failures for one username, or from one client IP,
# in a sliding window of STAFF_LOGIN_WINDOW seconds, every attempt is refused until the count falls back.
STAFF_LOGIN_MAX_FAILURES = config.integer("STAFF_LOGIN_MAX_FAILURES", 5, minimum=1)
STAFF_LOGIN_WINDOW = config.integer("STAFF_LOGIN_WINDOW", 900, minimum=60)
# Temporary inboxes (webinbox/): lifetime, "extend" (how many times, by how much), and how many
# one client IP may create per hour (web and API together).
TEMP_INBOX_TTL = config.integer("TEMP_INBOX_TTL", 24 * 3600, minimum=60)
TEMP_INBOX_EXTENSIONS = config.integer("TEMP_INBOX_EXTENSIONS", 2, minimum=0, maximum=10)
TEMP_INBOX_EXTENSION = config.integer("TEMP_INBOX_EXTENSION", 24 * 3600, minimum=60)
TEMP_INBOX_RATE_PER_HOUR = config.integer("TEMP_INBOX_RATE_PER_HOUR", 10, minimum=1)

# --- Cache (rate limits) ---------------------------------------------------------------
# CACHE_URL: redis://host:port/db, locmem:// (one process only) or file:///path. Default:
# Redis when the broker is Redis, else a file cache under DATA_DIR shared by every process.
_cache_url = config.string("CACHE_URL", "")
if not _cache_url and CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    _cache_url = CELERY_BROKER_URL
# Room for 100,000 keys (Django's default is 300: a flood of new keys, one an address, would
# cull live rate-limit counters with them); once full, a tenth is culled (the least recently
# used in locmem, at random in the file cache, which counts its files at most every 10 s:
# mailplatform/cache.py).
_CACHE_BOUNDS = {"MAX_ENTRIES": 100_000, "CULL_FREQUENCY": 10}
if _cache_url.startswith(("redis://", "rediss://")):
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": _cache_url,
            "KEY_PREFIX": config.string("CACHE_KEY_PREFIX", "mp-cache"),
            "OPTIONS": {"socket_connect_timeout": 2, "socket_timeout": 2},
        }
    }
elif _cache_url.startswith("locmem://"):
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "OPTIONS": _CACHE_BOUNDS}}
elif not _cache_url or _cache_url.startswith("file://"):
    _cache_dir = Path(_cache_url.removeprefix("file://") or DATA_DIR / "cache")
    CACHES = {
        "default": {
            "BACKEND": "mailplatform.cache.FileBasedCache",
            "LOCATION": str(_cache_dir),
            "OPTIONS": _CACHE_BOUNDS,
        }
    }
else:
    raise ImproperlyConfigured(f"CACHE_URL: expected redis://, rediss://, locmem:// or file://, got {_cache_url!r}")

# --- Security --------------------------------------------------------------------------
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_HTTPONLY = True
_https = BASE_URL.startswith("https://")
SESSION_COOKIE_SECURE = _https
CSRF_COOKIE_SECURE = _https
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
if _https and not DEBUG:
    SECURE_HSTS_SECONDS = 31536000
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = config.boolean("SECURE_HSTS_PRELOAD", True)
    # Plain http is redirected, except the probes a load balancer sends inside the network.
    SECURE_SSL_REDIRECT = config.boolean("SECURE_SSL_REDIRECT", True)
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
    if TRUSTED_PROXIES:  # TLS ends at the proxy, which must overwrite X-Forwarded-Proto
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- Logging ---------------------------------------------------------------------------
LOG_LEVEL = config.string("LOG_LEVEL", "INFO").upper()
LOG_FORMAT = config.string("LOG_FORMAT", "text" if DEBUG else "json")
if LOG_FORMAT not in {"json", "text"}:
    raise ImproperlyConfigured(f"LOG_FORMAT: expected 'json' or 'text', got {LOG_FORMAT!r}")
# mailplatform.logs.configure applies LOGGING, then redacts credentials (inbox and sign-in
# tokens in paths, signatures in query strings) on the servers' own loggers (uvicorn's access
# log) and quiets the every-2-seconds beat tick; every line through "console" is redacted too.
LOGGING_CONFIG = "mailplatform.logs.configure"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "audit.context.LogContextFilter"}},
    "formatters": {
        "json": {"()": "mailplatform.logs.RedactingFormatter", "inner": "audit.context.JsonFormatter"},
        "text": {
            "()": "mailplatform.logs.RedactingFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s [%(trace_id)s] %(message)s",
        },
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["context"]},
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        "botocore": {"level": "WARNING"},
        "urllib3": {"level": "WARNING"},
    },
}
