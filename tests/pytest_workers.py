"""A pytest plugin that gives each pytest-xdist worker a broker and a data folder of its own.

``make test`` runs the suite on several xdist workers. pytest-django already gives each
worker a database of its own (``test_<name>_gw0``, ``test_<name>_gw1``); this plugin does the
same for what the settings read from the environment when they load: the Redis database the
Celery workers a test starts consume from (two workers on one broker database would take each
other's tasks, for rows in the other's database) and ``DATA_DIR`` (the spools, the embedded
blob folder, the metrics folder). It runs when pytest imports it (``python -m pytest -p tests.pytest_workers -n 2``,
as ``make test`` does), before pytest-env applies the ini defaults and before pytest-django
loads the settings; outside xdist it changes nothing. It imports nothing of mailplatform's:
importing that package loads the settings.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
REDIS_DATABASES = 16


def ini_default(name: str) -> str:
    """The value pyproject's [tool.pytest_env] gives a variable (pytest-env applies it later)."""
    with (ROOT / "pyproject.toml").open("rb") as file:
        entry = tomllib.load(file)["tool"]["pytest_env"].get(name, "")
    return str(entry["value"] if isinstance(entry, dict) else entry)


def broker_of_worker(broker: str, index: int) -> str:
    """The Redis broker URL for worker ``index``: the database number counted down from the base one."""
    parts = urlsplit(broker)
    if parts.scheme not in {"redis", "rediss"}:
        raise RuntimeError(
            f"pytest-xdist workers each need a broker of their own; CELERY_BROKER_URL={parts.scheme}://... "
            "is not Redis: run the suite without -n, or point CELERY_BROKER_URL at Redis"
        )
    base = int(parts.path.strip("/") or 0)
    return urlunsplit(parts._replace(path=f"/{(base - index) % REDIS_DATABASES}"))


def worker_environment(worker: str, environ: dict[str, str]) -> dict[str, str]:
    """The variables worker ``gwN`` runs with, from the ones the run was started with."""
    index = int(worker.removeprefix("gw"))
    data_dir = environ.get("DATA_DIR") or ini_default("DATA_DIR")
    broker = environ.get("CELERY_BROKER_URL") or ini_default("CELERY_BROKER_URL")
    own = {"DATA_DIR": f"{data_dir}-{worker}", "CELERY_BROKER_URL": broker_of_worker(broker, index)}
    # The controller loaded the settings too, which set PROMETHEUS_MULTIPROC_DIR (DATA_DIR/metrics)
    # in the environment the workers inherit: without a folder each, one worker's /metrics would
    # count what the other's processes did.
    for name in ("METRICS_DIR", "PROMETHEUS_MULTIPROC_DIR"):
        if environ.get(name):
            own[name] = f"{environ[name].rstrip('/')}-{worker}"
    return own


_worker = os.environ.get("PYTEST_XDIST_WORKER")
if _worker:
    os.environ.update(worker_environment(_worker, dict(os.environ)))
