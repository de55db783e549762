"""Throwaway team servers for tests and local trials, without Docker: a PostgreSQL cluster
(initdb into a temp folder), an S3-compatible server (moto), and an ``mlflow server`` backed by
both. Each server runs as a child process in its own session (process group), listens on
127.0.0.1 only, and is stopped with its whole group; :func:`stop` checks that nothing is left.

``python tests/team/servers.py`` starts all three and prints the environment to use them (the
same commands are spelled out in docs/team.md).

Why these engines: PostgreSQL is what a team's MLflow registry runs on (Debian package
``postgresql``); moto's server is an S3 endpoint that installs from PyPI (``moto[server]``) and
keeps objects in memory, which is all a test needs (docs/team.md lists the alternatives).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

BIN = Path(sys.executable).parent
# Dummy credentials: moto accepts any; boto3 and DVC refuse to sign requests without some.
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
PG_USER = "postgres"  # the OS user the cluster runs as when we are root (created if missing)
PG_DB_USER = "mlflow"  # the database superuser initdb creates (trust auth on loopback only)
START_TIMEOUT_S = 120  # an mlflow server migrating a fresh PostgreSQL schema on 2 busy cores: ~10-20 s
STOP_TIMEOUT_S = 20


class Missing(RuntimeError):
    """A package or binary a team server needs is not installed (the message names it)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- process groups ---------------------------------------------------------------------------

@dataclass
class Proc:
    """A server child in its own session; ``stop`` ends the whole group."""

    name: str
    popen: subprocess.Popen
    log: Path
    stop_signal: int = signal.SIGTERM
    extra: dict = field(default_factory=dict)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        """Signal the leader's group, wait, SIGKILL what is left; raise if a process survives.

        The processes to wait for are the leader's group plus every descendant, collected before
        the signal: PostgreSQL's children call setsid() and leave the group, uvicorn's workers
        stay in it.
        """
        pgid = self.popen.pid  # start_new_session: the child leads its own group
        # (pid, start time): a pid the kernel reuses for an unrelated process is never waited on or killed
        tracked = {(p, _start_time(p)) for p in set(_group_pids(pgid)) | _descendants(pgid) | {pgid}}
        try:
            os.killpg(pgid, self.stop_signal)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while True:
            left = [p for p, t in tracked if _running(p, t)]
            if not left:
                break
            if time.monotonic() > deadline:
                for p in left:
                    try:  # pids just checked against their start times
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.5)
                left = [p for p, t in tracked if _running(p, t)]
                if left:
                    raise RuntimeError(f"{self.name}: processes {left} survive SIGKILL")
                break
            time.sleep(0.1)
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=STOP_TIMEOUT_S)


def _proc_stat(pid: int) -> Optional[list[str]]:
    """Fields after "pid (comm)" of /proc/<pid>/stat: state, ppid, pgrp, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _all_pids() -> list[int]:
    return [int(d.rsplit("/", 1)[1]) for d in glob.glob("/proc/[0-9]*")]


def _group_pids(pgid: int) -> list[int]:
    return [p for p in _all_pids() if (st := _proc_stat(p)) and int(st[2]) == pgid]


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in _all_pids():
        st = _proc_stat(p)
        if st:
            children.setdefault(int(st[1]), []).append(p)
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _start_time(pid: int) -> Optional[str]:
    st = _proc_stat(pid)
    return st[19] if st else None


def _running(pid: int, start_time: Optional[str]) -> bool:
    """The same process (pid and start time) exists and is not a zombie (an exited process
    waiting to be reaped)."""
    st = _proc_stat(pid)
    return st is not None and st[19] == start_time and st[0] not in ("Z", "X")


def _spawn(name: str, cmd: list[str], log: Path, env: Optional[dict] = None, cwd: Optional[Path] = None,
           user: Optional[str] = None, stop_signal: int = signal.SIGTERM) -> Proc:
    fh = open(log, "ab")
    try:
        kw = {}
        if user is not None:
            ent = pwd.getpwnam(user)
            kw = {"user": ent.pw_uid, "group": ent.pw_gid, "extra_groups": []}
        popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                 cwd=cwd, start_new_session=True, **kw)
    finally:
        fh.close()
    return Proc(name, popen, log, stop_signal)


def _wait(proc: Proc, ready, what: str, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited {proc.popen.returncode} before {what}:\n{proc.tail()}")
        try:
            if ready():
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name}: no {what} after {timeout:.0f} s:\n{proc.tail()}")
        time.sleep(0.25)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except OSError:
        return False


# ---- PostgreSQL -------------------------------------------------------------------------------

def pg_bindir() -> Path:
    """The folder holding ``initdb`` and ``postgres``: $POISONGATE_PG_BIN, PATH, or the newest
    Debian ``/usr/lib/postgresql/<major>/bin`` (Debian keeps them off PATH)."""
    explicit = os.environ.get("POISONGATE_PG_BIN")
    if explicit:  # set on purpose: no silent fallback to another installation
        if (Path(explicit) / "initdb").is_file() and (Path(explicit) / "postgres").is_file():
            return Path(explicit)
        raise Missing(f"POISONGATE_PG_BIN={explicit} holds no initdb/postgres (Debian package `postgresql`)")
    cands = []
    found = shutil.which("initdb")
    if found:
        cands.append(str(Path(found).parent))
    cands += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0, reverse=True)
    for c in cands:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "postgres").is_file():
            return Path(c)
    raise Missing("PostgreSQL server binaries (initdb, postgres) not found: install the Debian package "
                  "`postgresql` or set POISONGATE_PG_BIN to the folder holding them")


def pg_os_user() -> Optional[str]:
    """None when we are not root (the cluster runs as us); else an unprivileged user, since
    PostgreSQL refuses to run as root. Creates a system user ``postgres`` when none exists."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        useradd = shutil.which("useradd")
        if not useradd:
            raise Missing(f"running as root, no `{PG_USER}` user and no `useradd` to create one: PostgreSQL refuses root")
        subprocess.run([useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
                       check=True, capture_output=True)
    return PG_USER


def require_psycopg2() -> None:
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        raise Missing("Python package psycopg2 (pip install psycopg2-binary) is missing: mlflow cannot talk to PostgreSQL") from None


@dataclass
class Postgres:
    proc: Proc
    port: int
    datadir: Path

    def uri(self, db: str) -> str:
        # psycopg2 named explicitly: SQLAlchemy 2.1 defaults postgresql:// to psycopg (v3)
        return f"postgresql+psycopg2://{PG_DB_USER}@127.0.0.1:{self.port}/{db}"

    def create_database(self, db: str) -> str:
        """A fresh database (one per server or test: isolated registries); its URI."""
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=PG_DB_USER, dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{db}"')
        finally:
            conn.close()
        return self.uri(db)

    def stop(self) -> None:
        try:
            self.proc.stop()  # SIGINT: fast shutdown (abort transactions, no checkpoint wait)
        finally:
            shutil.rmtree(self.datadir, ignore_errors=True)


def start_postgres(workdir: Path) -> Postgres:
    """initdb a cluster into a fresh temp folder and run ``postgres`` on a free loopback port.

    The data folder is made with mkdtemp outside ``workdir``: pytest's temp tree is root-only
    (0700), which the ``postgres`` user cannot traverse. Durability is switched off (fsync,
    full_page_writes, synchronous_commit): the cluster is thrown away, and commits stay atomic.
    """
    bindir = pg_bindir()
    require_psycopg2()
    user = pg_os_user()
    datadir = Path(tempfile.mkdtemp(prefix="poisongate-pg-"))
    try:
        if user is not None:
            ent = pwd.getpwnam(user)
            os.chown(datadir, ent.pw_uid, ent.pw_gid)
            ids = {"user": ent.pw_uid, "group": ent.pw_gid, "extra_groups": []}
        else:
            ids = {}
        log = workdir / "postgres.log"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        init = subprocess.run([str(bindir / "initdb"), "-D", str(datadir / "data"), "-U", PG_DB_USER, "-A", "trust",
                               "-E", "UTF8", "--no-sync", "--no-instructions"],
                              cwd=datadir, env=env, capture_output=True, text=True, timeout=120, **ids)
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout[-2000:]}\n{init.stderr[-2000:]}")
        port = free_port()
        proc = _spawn("postgres", [str(bindir / "postgres"), "-D", str(datadir / "data"), "-p", str(port),
                                   "-h", "127.0.0.1", "-k", str(datadir), "-c", "fsync=off",
                                   "-c", "full_page_writes=off", "-c", "synchronous_commit=off",
                                   "-c", "max_connections=100"],
                      log, env=env, cwd=datadir, user=user, stop_signal=signal.SIGINT)
        pg = Postgres(proc, port, datadir)
    except BaseException:
        shutil.rmtree(datadir, ignore_errors=True)
        raise
    try:
        import psycopg2

        def ready() -> bool:
            psycopg2.connect(host="127.0.0.1", port=port, user=PG_DB_USER, dbname="postgres", connect_timeout=2).close()
            return True

        _wait(proc, ready, "accepted connection")
    except BaseException:
        pg.stop()
        raise
    return pg


# ---- S3 (moto) --------------------------------------------------------------------------------

@dataclass
class S3Server:
    proc: Proc
    endpoint: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"], region_name=S3_ENV["AWS_DEFAULT_REGION"])

    def create_bucket(self, bucket: str) -> str:
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self) -> None:
        self.proc.stop()


def start_s3(workdir: Path) -> S3Server:
    """``moto_server`` on a free loopback port (objects in memory, gone when it stops)."""
    exe = BIN / "moto_server"
    if not exe.is_file():
        found = shutil.which("moto_server")
        if not found:
            raise Missing("moto_server not found: pip install 'moto[server]' (the S3-compatible test server)")
        exe = Path(found)
    try:
        import boto3  # noqa: F401
    except ImportError:
        raise Missing("Python package boto3 is missing (installed with moto[server] / dvc-s3)") from None
    port = free_port()
    proc = _spawn("moto_server", [str(exe), "-H", "127.0.0.1", "-p", str(port)], workdir / "moto.log",
                  env={**os.environ, **S3_ENV})
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait(proc, lambda: _http_ok(f"{endpoint}/moto-api/"), "answer on /moto-api/")
    except BaseException:
        proc.stop()
        raise
    return S3Server(proc, endpoint)


# ---- mlflow server ----------------------------------------------------------------------------

@dataclass
class MlflowServer:
    proc: Proc
    url: str
    backend_uri: str
    artifacts: str

    def stop(self) -> None:
        self.proc.stop()


def start_mlflow(workdir: Path, backend_uri: str, artifacts_destination: str, s3_endpoint: Optional[str],
                 workers: int = 2, name: str = "mlflow") -> MlflowServer:
    """``mlflow server`` with the registry in ``backend_uri`` and artifacts proxied to
    ``artifacts_destination`` (``--serve-artifacts``: clients never see S3 credentials).

    Two workers: two processes answer requests, so racing clients really hit the database
    concurrently (one worker would serialise some of them in its thread pool).
    """
    exe = BIN / "mlflow"
    if not exe.is_file():
        raise Missing(f"mlflow CLI not found next to {sys.executable}")
    port = free_port()
    env = {**os.environ, **S3_ENV}
    if s3_endpoint:
        env["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint
    env.pop("MLFLOW_TRACKING_URI", None)
    # The job runner (huey consumers for MLflow's GenAI jobs) is not used here and costs ~7
    # extra processes and tens of seconds at start on 2 cores.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    cmd = [str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
           "--backend-store-uri", backend_uri, "--serve-artifacts", "--artifacts-destination", artifacts_destination]
    proc = _spawn(name, cmd, workdir / f"{name}.log", env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(proc, lambda: _http_ok(f"{url}/health"), "healthy /health")
    except BaseException:
        proc.stop()
        raise
    return MlflowServer(proc, url, backend_uri, artifacts_destination)


def stop_all(*servers) -> None:
    """Stop in reverse start order; every one is tried, the first error is raised after."""
    errors = []
    for s in reversed([s for s in servers if s is not None]):
        try:
            s.stop()
        except Exception as exc:  # keep stopping the others
            errors.append(exc)
    if errors:
        raise errors[0]


def main() -> int:
    """Start PostgreSQL, moto and mlflow server in the foreground; Ctrl-C stops them."""
    def interrupt(signum, frame):  # SIGTERM stops the servers like Ctrl-C (handlers are not inherited)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    work = Path(tempfile.mkdtemp(prefix="poisongate-team-"))
    pg = s3 = ml = None
    try:
        pg = start_postgres(work)
        s3 = start_s3(work)
        s3.create_bucket("poisongate")
        ml = start_mlflow(work, pg.create_database("mlflow"), "s3://poisongate/mlartifacts", s3.endpoint)
        print(f"logs in {work}")
        print(f"export MLFLOW_TRACKING_URI={ml.url}")
        print(f"# DVC remote: s3://poisongate/dvc  endpointurl={s3.endpoint}  (AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing)")
        print("Ctrl-C stops all three.")
        sys.stdout.flush()
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    except Missing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        stop_all(pg, s3, ml)
    return 0


if __name__ == "__main__":
    sys.exit(main())
