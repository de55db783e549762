"""Fixtures for the team tier: throwaway servers started once per session and always stopped.

- ``postgres``: a PostgreSQL cluster (initdb into a temp folder, loopback port);
- ``s3``: ``moto_server`` with the bucket ``poisongate``;
- ``team_server``: ``mlflow server`` on a fresh PostgreSQL database, artifacts proxied to
  ``s3://poisongate/mlartifacts`` (``--serve-artifacts``).

A test is skipped only when a package or binary is missing, and the skip reason names it
(``pytest -rs`` prints it; the project's addopts has ``-ra``). Any other failure to start is an
error. Tests share the servers and isolate themselves by registered-model name
(``mlflow.model_name=...``) or database.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from . import servers

BUCKET = "poisongate"


def _start(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except servers.Missing as exc:
        pytest.skip(f"team server not started, missing dependency: {exc}")


@pytest.fixture(scope="session")
def team_logs(tmp_path_factory) -> Path:
    """Server logs (kept in pytest's temp tree for a failed run's post-mortem)."""
    return tmp_path_factory.mktemp("team-servers")


@pytest.fixture(scope="session")
def postgres(team_logs):
    pg = _start(servers.start_postgres, team_logs)
    yield pg
    pg.stop()


@pytest.fixture(scope="session")
def s3(team_logs):
    srv = _start(servers.start_s3, team_logs)
    try:
        srv.create_bucket(BUCKET)
    except BaseException:
        srv.stop()
        raise
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def team_server(team_logs, postgres, s3):
    """``mlflow server`` on PostgreSQL + S3; ``.url`` is the MLFLOW_TRACKING_URI to use."""
    uri = postgres.create_database("mlflow")
    srv = _start(servers.start_mlflow, team_logs, uri, f"s3://{BUCKET}/mlartifacts", s3.endpoint)
    yield srv
    srv.stop()


@pytest.fixture
def unique_name() -> str:
    """A registered-model name no other test uses on the shared server."""
    return f"pg-{uuid.uuid4().hex[:10]}"


def s3_env(s3_server) -> dict[str, str]:
    """Environment for a process that talks to the S3 server itself (DVC, boto3)."""
    return {**servers.S3_ENV, "AWS_ENDPOINT_URL": s3_server.endpoint}


@pytest.fixture
def sqlite_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"

