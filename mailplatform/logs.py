"""Logging set-up beyond settings.LOGGING: credentials redacted from every line, quiet ticks.

Django calls :func:`configure` (``LOGGING_CONFIG``) with ``settings.LOGGING`` when it starts,
in every process that loads the project: uvicorn's workers (importing the ASGI application),
gunicorn's, Celery's and ``manage.py``. So the servers' own loggers are covered however they
were started, with no ``--log-config`` to keep in step.
"""

from __future__ import annotations

import logging
import logging.config
import re
from collections.abc import Mapping
from typing import Any

from django.utils.module_loading import import_string

REDACTED = "[redacted]"

# URL paths whose segment after the prefix is a credential: a temporary inbox's link
# (/t/<token>/), a sign-in link (/login/link/<token>/, not its fixed confirm/ page), a
# signed blob download (/blobs/<token>/) and an account binding's link (/api/v1/links/<link>/).
_TOKEN_PATH = re.compile(r"(/(?:t|blobs|login/link|api/v1/links)/)(?!confirm/|\[redacted\])[^/\s?#\"']+")
# Query parameters that carry a credential: our own signed links, and the OIDC callback's
# authorization code and state (RFC 6749, section 4.1.2), S3 presigned URLs' signature.
_SECRET_PARAM = re.compile(
    r"([?&;](?:token|signature|sig|key|api_key|code|state|password|secret"
    r"|x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&;\s#\"']*",
    re.IGNORECASE,
)
# A credential that found its way into a message anyway: an API key, a binding's link or an
# app password (mp_, mpl_, mpa_ + 38 base62 characters, tenants/keys.py) or a webhook secret
# (whsec_ + base64, webhooks/signing.py).
_KEY_LIKE = re.compile(r"\b(?:mp[la]?_[A-Za-z0-9]{38}|whsec_[A-Za-z0-9+/]{40,}={0,2})")


def redact(text: str) -> str:
    """``text`` with every credential we know the shape of replaced by ``[redacted]``."""
    if "/" not in text and "=" not in text and "_" not in text:
        return text  # the common case: nothing that could match, no regex work
    text = _TOKEN_PATH.sub(lambda match: match.group(1) + REDACTED, text)
    text = _SECRET_PARAM.sub(lambda match: match.group(1) + REDACTED, text)
    return _KEY_LIKE.sub(REDACTED, text)


def _redact_value(value: Any) -> Any:
    return redact(value) if isinstance(value, str) else value


class CredentialsFilter(logging.Filter):
    """Redacts the message and its arguments in place (keeping their shape: uvicorn's access
    formatter unpacks the arguments tuple), on loggers whose handlers are not ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, Mapping):
            record.args = {key: _redact_value(value) for key, value in record.args.items()}
        elif isinstance(record.args, tuple):
            record.args = tuple(_redact_value(value) for value in record.args)
        return True


class RedactingFormatter(logging.Formatter):
    """Another formatter's output, redacted: the whole line, including the ``extra`` fields
    (django.request's ``request``, whose repr holds the path) and tracebacks."""

    def __init__(self, inner: str = "logging.Formatter", **options: Any) -> None:
        super().__init__()
        self.inner: logging.Formatter = import_string(inner)(**options)

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))


# Beat tasks that run every few seconds: their "sent", "received" and "succeeded: 0" lines
# are DEBUG; a run that did something (a non-zero result) stays at INFO.
TICK_TASKS = frozenset({"webhooks.tasks.deliveries_dispatch", "outbound.tasks.recipients_due_dispatch"})
_IDLE_RESULTS = frozenset({"0", "None", "[]"})


class QuietTicksFilter(logging.Filter):
    """Demotes Celery's per-run INFO lines of :data:`TICK_TASKS` to DEBUG unless the run did work."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not self._is_idle_tick(record):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)

    @staticmethod
    def _is_idle_tick(record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, Mapping):  # celery.worker.strategy "received", celery.app.trace "succeeded"
            if args.get("name") not in TICK_TASKS:
                return False
            return "return_value" not in args or str(args["return_value"]) in _IDLE_RESULTS
        # celery.beat: "Scheduler: Sending due task %s (%s)" % (entry name, task name)
        return isinstance(args, tuple) and len(args) == 2 and args[1] in TICK_TASKS


# Loggers whose records reach handlers other than settings.LOGGING's (uvicorn and gunicorn
# install their own), or whose messages carry the request path (django.request, django.server).
CREDENTIAL_LOGGERS = (
    "uvicorn.access",
    "uvicorn.error",
    "gunicorn.access",
    "gunicorn.error",
    "django.request",
    "django.server",
)
TICK_LOGGERS = ("celery.beat", "celery.worker.strategy", "celery.app.trace")


def configure(config: dict[str, Any]) -> None:
    """``LOGGING_CONFIG``: apply ``settings.LOGGING``, then add the filters to loggers that
    must keep their own handlers (listing them in LOGGING would replace those handlers, and
    undo uvicorn's ``--log-level`` and ``--no-access-log``)."""
    logging.config.dictConfig(config)
    for name in CREDENTIAL_LOGGERS:
        _add_once(logging.getLogger(name), CredentialsFilter)
    for name in TICK_LOGGERS:
        _add_once(logging.getLogger(name), QuietTicksFilter)


def _add_once(logger: logging.Logger, kind: type[logging.Filter]) -> None:
    if not any(isinstance(existing, kind) for existing in logger.filters):
        logger.addFilter(kind())
