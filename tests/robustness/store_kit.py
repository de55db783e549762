"""Helpers of the store and source robustness cases (test_store_*.py, test_source_*.py).

Each case asserts three things: the exit code, a message naming the file or key, and that
nothing was lost: the store's bytes and the pointer are what they were before the refused run.
The snapshot stage runs in-process through its ``main`` (fast) unless a case needs a process of
its own (kill -9, peak memory).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import OmegaConf

from pipeline import config, snapshot
from pipeline.data import sources, store

REPO = Path(__file__).resolve().parents[2]
_BASE: dict = {}


def base_params() -> dict:
    if not _BASE:
        _BASE.update(OmegaConf.to_container(config.compose([])))
    return _BASE


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root (or of root itself when it is a file)."""
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


class Stage:
    """One snapshot-stage workspace: params.yaml, data/store, data/snapshot.json, the report."""

    def __init__(self, tmp: Path, source: Path, **data):
        self.tmp = tmp
        self.params = tmp / "params.yaml"
        self.store = tmp / "data" / "store"
        self.pointer = tmp / "data" / "snapshot.json"
        self.report = tmp / "reports" / "snapshot.json"
        self.stat = tmp / "data" / ".snapshot-stat"
        self.source = source
        self.write_params(**data)

    def write_params(self, **data) -> None:
        base = base_params()
        raw = {**base, "data": {**base["data"], "name": "imagefolder", "path": str(self.source), "workers": 1, **data}}
        self.params.write_text(OmegaConf.to_yaml(OmegaConf.create(raw)))

    def argv(self) -> list[str]:
        return ["--params", str(self.params), "--store", str(self.store), "--pointer", str(self.pointer),
                "--report", str(self.report), "--stat-cache", str(self.stat)]

    def main(self, capsys, *extra: str) -> tuple[int, str]:
        rc = snapshot.main(self.argv() + list(extra))
        return rc, capsys.readouterr().err

    def kept(self) -> dict:
        """What must survive a refused run byte for byte: the store and the pointer."""
        return {"store": tree_digest(self.store), "pointer": tree_digest(self.pointer)}

    def verify(self, capsys, *extra: str) -> tuple[int, str]:
        rc = store.main(["verify", "--store", str(self.store), *extra])
        return rc, capsys.readouterr().err

    @property
    def key(self) -> str:
        return sources.source_key(config.load(self.params).data)

    def head(self) -> str:
        return (self.store / "heads" / self.key).read_text().strip()

    def header(self, sid: Optional[str] = None) -> dict:
        sid = sid or self.head()
        return json.loads(store.header_path(self.store, sid).read_text())

    def delta_path(self, sid: Optional[str] = None) -> Path:
        return self.store / "deltas" / f"{self.header(sid)['delta']['sha256']}.parquet"


def rewrite_delta(path: Path, edit) -> Path:
    """Apply ``edit(DataFrame) -> DataFrame`` to a delta and write it back in place (a tamper)."""
    df = pq.read_table(path).to_pandas()
    df = edit(df)
    pq.write_table(pa.Table.from_pandas(df, schema=store.DELTA_SCHEMA, preserve_index=False), path)
    return path


def run_measured(argv: list[str], cwd: Path = REPO, timeout: float = 300,
                 env: Optional[dict] = None) -> tuple[int, str, int]:
    """Run the snapshot stage in a fresh process: (exit code, stderr, peak RSS in bytes of the
    process (VmHWM) and its worker children (resource.getrusage))."""
    code = (
        "import json, resource, sys\n"
        "from pipeline import snapshot\n"
        "rc = snapshot.main(sys.argv[1:])\n"
        # VmHWM, not RUSAGE_SELF: Linux carries ru_maxrss across exec, so a process started from
        # a big parent (pytest after a torch/MLflow fixture: ~1.2 GB) would report the parent's RSS
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
        "me = int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(json.dumps({'rss_kb': max(me, kids)}))\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    rss = json.loads(proc.stdout.strip().splitlines()[-1])["rss_kb"] * 1024 if proc.stdout.strip() else -1
    return proc.returncode, proc.stderr, rss
