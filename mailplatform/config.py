"""Strict reading of the environment for settings.py.

Every variable has a safe embedded default; a value that is present but wrong stops the
process at start with an ImproperlyConfigured naming the variable, instead of surfacing
later as a confusing runtime error. Secrets may also come from ``<NAME>_FILE``.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from urllib.parse import urlsplit

import environ
from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
# Like a command-line usage error (argparse's code): the process cannot start as configured.
CONFIGURATION_ERROR_EXIT = 2


def settings_load_or_exit() -> None:
    """Load the settings now; a wrong value prints ``configuration error: <message>`` (one
    line, naming the variable) on stderr and exits with code 2, instead of a traceback.

    Called when the ``mailplatform`` package is imported (mailplatform/celery.py), which
    every entry point does first: manage.py, uvicorn (through mailplatform.asgi) and
    Celery's ``-A mailplatform``.
    """
    from django.conf import settings

    try:
        settings.INSTALLED_APPS  # noqa: B018 - touching a setting imports the settings module
    except ImproperlyConfigured as error:
        sys.stderr.write(f"configuration error: {error}\n")
        sys.stderr.flush()
        raise SystemExit(CONFIGURATION_ERROR_EXIT) from None


_FALSE = {"0", "false", "no", "off", ""}


def raw(name: str) -> str | None:
    """The variable's value, or the content of the file named by ``<NAME>_FILE``."""
    value = os.environ.get(name)
    if value is not None:
        return value
    path = os.environ.get(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE: cannot read {path!r}: {exc}") from exc
    return None


# The domain that names a local installation in mail (RFC 6761 section 6.3: .localhost never
# leaves the machine), and the demo's domains live under it.
LOCAL_MAIL_DOMAIN = "mailplatform.localhost"


def mail_domain(host: str) -> str:
    """The domain that names this platform in mail by default (MX host, sender address): ``host``
    (BASE_URL's), unless it is an IP literal, ``localhost`` or a single label. None of those is a
    mail domain: ``mx.127.0.0.1`` is no host name, and an address at an IP must be a bracketed
    address literal (RFC 5321 section 4.1.3) that mail servers refuse."""
    import ipaddress

    name = host.strip().strip("[]").rstrip(".").lower()
    try:
        ipaddress.ip_address(name)
    except ValueError:
        if "." in name:  # localhost and other single labels are no mail domain
            return name
    return LOCAL_MAIL_DOMAIN


def string(name: str, default: str) -> str:
    value = raw(name)
    return default if value is None or value == "" else value


def boolean(name: str, default: bool) -> bool:
    value = raw(name)
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}: expected a boolean (true/false/1/0), got {value!r}")


def integer(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    value = raw(name)
    if value is None or value.strip() == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}: expected an integer, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name}: must be at least {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ImproperlyConfigured(f"{name}: must be at most {maximum}, got {number}")
    return number


def csv(name: str, default: list[str]) -> list[str]:
    value = raw(name)
    if value is None:
        return list(default)
    return [item.strip() for item in value.split(",") if item.strip()]


def host_ports(name: str, *, default_port: int) -> list[tuple[str, int]]:
    """A comma-separated list of ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    result = []
    for item in csv(name, []):
        host, port = item, str(default_port)
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else port
        elif item.count(":") == 1:
            host, port = item.split(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ImproperlyConfigured(f"{name}: {item!r} is not host[:port]")
        result.append((host, int(port)))
    return result


def cidrs(name: str, default: list[str]) -> list[str]:
    """A comma-separated list of networks (``10.0.0.0/8``, ``2001:db8::/32``, or addresses)."""
    import ipaddress

    values = csv(name, default)
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ImproperlyConfigured(f"{name}: {value!r} is not an IP network") from None
    return values


def url(name: str, default: str, *, schemes: set[str]) -> str:
    value = string(name, default)
    scheme = urlsplit(value).scheme
    if scheme not in schemes:
        allowed = ", ".join(sorted(schemes))
        raise ImproperlyConfigured(f"{name}: scheme {scheme!r} is not supported (use one of: {allowed})")
    return value


def database(name: str, default: str) -> dict[str, object]:
    value = url(name, default, schemes={"sqlite", "postgres", "postgresql", "pgsql"})
    try:
        config: dict[str, object] = environ.Env.db_url_config(value)
    except Exception as exc:  # django-environ raises several types for a malformed URL
        raise ImproperlyConfigured(f"{name}: cannot parse {value!r}: {exc}") from exc
    if config["ENGINE"] == "django.db.backends.sqlite3" and config.get("NAME") in (None, "", ":memory:"):
        raise ImproperlyConfigured(f"{name}: an SQLite database needs a file path")
    return config


def email(name: str, default: str) -> dict[str, object]:
    value = string(name, default)
    try:
        return dict(environ.Env.email_url_config(value))
    except Exception as exc:
        raise ImproperlyConfigured(f"{name}: cannot parse {value!r}: {exc}") from exc


def persistent_secret(name: str, data_dir: Path, *, generate: object = None) -> str:
    """The secret from the environment, or one generated once and kept under DATA_DIR.

    The embedded default must be safe (never a constant in the source) and stable across
    restarts, so it is created with 0600 permissions on first use.
    """
    value = raw(name)
    if value:
        return value
    path = data_dir / "secrets" / name.lower()
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    made = generate() if callable(generate) else secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(made)
    return str(made)
