"""Each pytest-xdist worker of ``make test`` gets a broker database and a DATA_DIR of its own."""

from __future__ import annotations

import pytest

from tests.pytest_workers import broker_of_worker, ini_default, worker_environment


def test_it_counts_the_broker_database_down_from_the_one_the_run_was_given() -> None:
    assert broker_of_worker("redis://127.0.0.1:6379/15", 0) == "redis://127.0.0.1:6379/15"
    assert broker_of_worker("redis://127.0.0.1:6379/15", 1) == "redis://127.0.0.1:6379/14"
    assert broker_of_worker("rediss://:pw@cache:6380/0", 1) == "rediss://:pw@cache:6380/15"


def test_it_refuses_a_broker_it_cannot_split_between_workers() -> None:
    with pytest.raises(RuntimeError, match="not Redis"):
        broker_of_worker("amqp://guest:guest@127.0.0.1:5672//", 1)


def test_it_gives_each_worker_its_own_data_dir_from_the_environment_or_the_ini_default() -> None:
    given = worker_environment("gw1", {"DATA_DIR": "var/ci", "CELERY_BROKER_URL": "redis://127.0.0.1:6379/9"})
    assert given == {"DATA_DIR": "var/ci-gw1", "CELERY_BROKER_URL": "redis://127.0.0.1:6379/8"}
    defaults = worker_environment("gw0", {})
    assert defaults["DATA_DIR"] == f"{ini_default('DATA_DIR')}-gw0"
    assert defaults["CELERY_BROKER_URL"] == ini_default("CELERY_BROKER_URL")


def test_it_gives_each_worker_its_own_metrics_folder_when_the_controller_set_one() -> None:
    given = worker_environment("gw0", {"DATA_DIR": "var/ci", "PROMETHEUS_MULTIPROC_DIR": "var/ci/metrics/"})
    assert given["PROMETHEUS_MULTIPROC_DIR"] == "var/ci/metrics-gw0"
    assert "METRICS_DIR" not in given
