"""docker-compose.yml and the Dockerfile cannot run here (no Docker engine); these tests keep
them consistent with the settings and the contract instead."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from mailplatform.testing import run_script

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = {  # DESIGN section 6
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "S3_ENDPOINT_URL",
    "S3_BUCKET",
    "S3_ACCESS_KEY_ID",
    "S3_SECRET_ACCESS_KEY",
    "S3_REGION",
    "DATA_DIR",
    "SPOOL_DIR",
    "SMTP_HOST",
    "SMTP_PORT",
    "SECRET_KEY",
    "DEBUG",
    "ALLOWED_HOSTS",
    "BASE_URL",
    "EMAIL_URL",
    "WEBHOOK_ALLOW_PRIVATE",
}
APP_SERVICES = ("migrate", "createbucket", "web", "smtp", "worker", "beat")


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_it_gives_every_app_service_the_contract_environment() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(compose["x-env"]) >= CONTRACT
    for name in APP_SERVICES:
        assert services[name]["environment"] == compose["x-env"], name
    assert "DEBUG" in compose["x-env"]
    assert compose["x-env"]["DEBUG"] == "false"
    assert compose["x-env"]["WEBHOOK_ALLOW_PRIVATE"] == "false"


def test_it_requires_secrets_from_the_environment_not_the_file() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    env = _compose()["x-env"]
    for name in ("SECRET_KEY", "API_KEY_PEPPER", "FIELD_ENCRYPTION_KEY", "S3_SECRET_ACCESS_KEY"):
        assert re.fullmatch(r"\$\{" + name + r":\?[^}]+\}", env[name]), name
    assert "POSTGRES_PASSWORD:?" in text


def test_it_runs_the_processes_the_design_names_with_health_checks() -> None:
    services = _compose()["services"]
    assert services["postgres"]["image"] == "postgres:16"
    assert services["redis"]["image"] == "redis:7"
    assert services["seaweedfs"]["image"].startswith("chrislusf/seaweedfs")
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "ping" in services["redis"]["healthcheck"]["test"]
    assert "/healthz" in " ".join(services["web"]["healthcheck"]["test"])
    assert services["smtp"]["command"] == ["python", "manage.py", "runsmtp", "--host", "0.0.0.0", "--port", "2525"]
    assert "spool:/spool" in services["smtp"]["volumes"]
    assert "spool" in _compose()["volumes"]
    assert "worker" in services["worker"]["command"]
    assert services["clamav"]["image"].startswith("clamav/clamav")
    assert _compose()["x-env"]["CLAMD_URL"] == "${CLAMD_URL:-tcp://clamav:3310}"
    assert "beat" in services["beat"]["command"]
    for name in ("web", "smtp", "worker", "beat"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["postgres"]["condition"] == "service_healthy", name


def test_it_builds_a_non_root_image_with_static_files() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert re.search(r"^USER mailplatform$", dockerfile, re.MULTILINE)
    assert "pip install -r requirements.txt" in dockerfile
    assert "collectstatic" in dockerfile
    assert ".venv" in (ROOT / ".dockerignore").read_text()


def test_it_documents_every_setting_in_the_readme() -> None:
    settings = (ROOT / "mailplatform" / "settings.py").read_text()
    names = set(re.findall(r'config\.[a-z_]+\(\s*"([A-Z][A-Z0-9_]+)"', settings))
    assert len(names) > 30
    readme = (ROOT / "README.md").read_text()
    missing = sorted(name for name in names if f"`{name}`" not in readme)
    assert missing == []


def test_it_runs_uvicorn_without_believing_proxy_headers_on_its_own() -> None:
    """uvicorn trusts X-Forwarded-For from 127.0.0.1 by default; only TRUSTED_PROXIES may decide."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmd = next(line for line in dockerfile.splitlines() if line.startswith("CMD "))
    assert "uvicorn" in cmd and '"--no-proxy-headers"' in cmd
    web = _compose()["services"]["web"]["command"]
    assert web[0] == "uvicorn" and "--no-proxy-headers" in web
    run = run_script()
    assert "--no-proxy-headers" in run.web_command("127.0.0.1", 8000)
    for text in (dockerfile, (ROOT / "docker-compose.yml").read_text(), (ROOT / "scripts" / "run.py").read_text()):
        assert "forwarded-allow-ips" not in text.lower() and "FORWARDED_ALLOW_IPS" not in text


def test_it_runs_uvicorn_without_probing_for_lifespan_events() -> None:
    """Django's ASGI application has none; uvicorn's probe only prints that they are unsupported."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmd = next(line for line in dockerfile.splitlines() if line.startswith("CMD "))
    assert '"--lifespan", "off"' in cmd
    web = _compose()["services"]["web"]["command"]
    assert web[web.index("--lifespan") + 1] == "off"
    run = run_script()
    command = run.web_command("127.0.0.1", 8000)
    assert command[command.index("--lifespan") + 1] == "off"
