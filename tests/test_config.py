"""Settings come from the environment; a present but wrong value stops the start, naming the variable."""

import os
import stat

import pytest
from django.core.exceptions import ImproperlyConfigured

from mailplatform import config


@pytest.fixture
def environ(monkeypatch):
    for name in ("MP_T", "MP_T_FILE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("TRUE", True), ("off", False), ("0", False)])
def test_it_reads_booleans(environ, value, expected):
    environ.setenv("MP_T", value)
    assert config.boolean("MP_T", not expected) is expected


def test_it_refuses_a_boolean_it_cannot_read(environ):
    environ.setenv("MP_T", "maybe")
    with pytest.raises(ImproperlyConfigured, match="MP_T"):
        config.boolean("MP_T", False)


def test_it_checks_integer_bounds(environ):
    environ.setenv("MP_T", "70000")
    with pytest.raises(ImproperlyConfigured, match="MP_T: must be at most 65535"):
        config.integer("MP_T", 1, maximum=65535)
    environ.setenv("MP_T", "twelve")
    with pytest.raises(ImproperlyConfigured, match="MP_T: expected an integer"):
        config.integer("MP_T", 1)


def test_it_refuses_unsupported_url_schemes(environ):
    environ.setenv("MP_T", "mysql://db/x")
    with pytest.raises(ImproperlyConfigured, match="MP_T: scheme 'mysql'"):
        config.database("MP_T", "sqlite:////tmp/x.sqlite3")


def test_it_parses_postgres_urls(environ):
    environ.setenv("MP_T", "postgres://user:p%40ss@db.internal:6432/mail")
    parsed = config.database("MP_T", "sqlite:////tmp/x.sqlite3")
    assert parsed["ENGINE"] == "django.db.backends.postgresql"
    assert (parsed["HOST"], parsed["PORT"], parsed["NAME"], parsed["PASSWORD"]) == ("db.internal", 6432, "mail", "p@ss")


def test_it_reads_secrets_from_files(environ, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("from-a-file\n")
    environ.setenv("MP_T_FILE", str(secret))
    assert config.string("MP_T", "default") == "from-a-file"
    environ.setenv("MP_T_FILE", str(tmp_path / "missing"))
    with pytest.raises(ImproperlyConfigured, match="MP_T_FILE"):
        config.string("MP_T", "default")


def test_it_keeps_a_generated_secret_private_and_stable(environ, tmp_path):
    first = config.persistent_secret("MP_T", tmp_path)
    assert config.persistent_secret("MP_T", tmp_path) == first
    assert len(first) >= 40
    mode = stat.S_IMODE(os.stat(tmp_path / "secrets" / "mp_t").st_mode)
    assert mode == 0o600
    environ.setenv("MP_T", "explicit")
    assert config.persistent_secret("MP_T", tmp_path) == "explicit"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "mailplatform.localhost"),
        ("::1", "mailplatform.localhost"),
        ("[2001:db8::1]", "mailplatform.localhost"),
        ("localhost", "mailplatform.localhost"),
        ("testserver", "mailplatform.localhost"),
        ("Mail.Example.COM.", "mail.example.com"),
        ("dev.localhost", "dev.localhost"),
    ],
)
def test_it_names_the_platform_in_mail_by_a_domain_never_an_ip(host, expected):
    assert config.mail_domain(host) == expected
