"""Install the project into a venv with uv, reading pip's own index settings; `make install` calls it.

Why uv: the same pinned set of packages (torch 2.14.1 with its CUDA wheels, mlflow, GX, dvc: 6.5 GB
unpacked) installs in ~26 s on the 2-core CI box with an empty uv cache, against ~95 s for pip
(`bench/results/install.md`). Why this script: uv does not read pip's configuration, and this
machine's indexes, local wheel folder and the torch/torchvision constraint file live there
(`pip config list`); the script hands them to uv, so uv resolves exactly what pip would.

Exit status 0 when uv installed everything; anything else (no uv to be had, a uv error) exits
non-zero and `make install` falls back to plain pip, so a machine without uv still installs.

    python tools/fast_install.py --python .venv/bin/python -- -e '.[dev]'
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path


def pip_config(python: str) -> dict[str, str]:
    """``pip config list`` as {key: value}; an environment (PIP_*) setting wins over a file's, as in pip."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True).stdout
    files: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip().strip("'\"")
        scope, _, name = key.strip().partition(".")
        if scope == ":env:":
            env[name] = value
        elif scope in ("global", "install"):
            files[name] = value
    return {**files, **env}


def uv_args(cfg: dict[str, str]) -> list[str]:
    """pip's index settings as uv options. pip takes the best version across every index it is
    given; uv's equivalent is ``--index-strategy unsafe-best-match`` (its default stops at the first
    index that has the package, which would pick PyPI's torch over the local one)."""
    args = ["--index-strategy", "unsafe-best-match"]
    if cfg.get("index-url"):
        args += ["--index-url", cfg["index-url"]]
    for url in cfg.get("extra-index-url", "").split():
        args += ["--extra-index-url", url]
    for link in cfg.get("find-links", "").split():
        args += ["--find-links", link]
    for c in cfg.get("constraint", "").split():
        args += ["--constraint", c]
    if cfg.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        args.append("--no-index")
    return args


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", required=True, help="the venv's interpreter")
    ap.add_argument("packages", nargs=argparse.REMAINDER, help="what to install (after --)")
    a = ap.parse_args(argv)
    packages = [p for p in a.packages if p != "--"]
    if not packages:
        ap.error("nothing to install: give the requirements after --")
    uv = Path(a.python).parent / "uv"
    if not uv.exists():
        got = subprocess.run([a.python, "-m", "pip", "install", "--quiet", "uv"])
        if got.returncode != 0 or not uv.exists():
            print("fast_install: uv is not installable here; pip installs instead", file=sys.stderr)
            return 3
    try:
        cfg = pip_config(a.python)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"fast_install: cannot read pip's configuration ({exc}); pip installs instead", file=sys.stderr)
        return 3
    env = dict(os.environ)
    cert = cfg.get("cert")
    if cert and Path(cert).is_file():
        env.setdefault("SSL_CERT_FILE", cert)  # the CA bundle pip was told to trust
    cmd = [str(uv), "pip", "install", "--quiet", "--python", a.python, "--compile-bytecode", *uv_args(cfg), *packages]
    print("+ " + shlex.join(cmd), flush=True)
    return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
