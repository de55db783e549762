"""Benchmark: the data path at 10k / 100k / 1M rows, today's code against the code the issue measured
(issue 19 item 7).

    python bench/scale.py [--sizes 10000,100000] [--old c901d6d] [--new HEAD] [--out bench/results/scale]

For each size N a synthetic ImageFolder source is written once (``--image``, default 28x28 grey
PNGs; ``--sources`` keeps them for the next run), 10 classes, every
fifth row in test/), then, for each code version, in a fresh workspace (``git archive`` of that
revision, its own params.yaml composed by its own ``pipeline.config``), the stages are run exactly
as its own dvc.yaml's ``cmd`` says, one process each:

  cold snapshot    - the snapshot stage on the new source (empty store);
  1% append        - N/100 new files added, the snapshot stage again;
  no-op dvc repro  - ``dvc repro --single-item snapshot`` twice; the second is timed. That is the
                     part of a no-op ``dvc repro`` that grows with N: the old code's ``${data.watch}``
                     dependency (DVC stats every file), today's always-changed snapshot stage (it
                     lists the source and finds nothing new). The other stages are skipped by DVC
                     in both versions at a cost that does not depend on N;
  poison           - the poison stage with no attack (it builds the training view);
  validate         - the validate stage (the data gate);
  train 1 epoch    - the train stage at train.epochs=1 (small_cnn, batch 64, CPU);
  twin 1 epoch     - the twin stage (the clean baseline model, same settings);
  evaluate         - the evaluate stage (candidate and twin over the test split, scan set, ASR);
  inspect          - the inspect stage at the conf's settings (k-fold of 1 epoch each, the clean
                     reference model matched to the candidate's steps, the two-view detector, the
                     scans), only at N <= ``--inspect-max-rows`` (default 100k): at 1M rows on this
                     CPU box its three fold fits and the detector's neighbour search are hours.

Each step: wall seconds, and the peak memory of the whole process tree (the stage and its decode
workers: the sum of their PSS, so pages a forked worker shares with its parent count once; sampled
every 20 ms with psutil), in MiB; the main process's own peak RSS goes to the JSON. One trial per
cell (run it again for another). Writes
``<out>.md`` (table, ratios new/old, the machine), ``<out>.json`` and ``<out>.png`` (time and
memory against N, log-log).

The old revision defaults to c901d6d, the last commit of wave 1, before any wave-2 work: the code
the issue's numbers were taken on (its store re-hashed every row on load and its snapshot stage
re-decoded every file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
STEPS = ("cold snapshot", "1% append", "no-op dvc repro", "poison", "validate", "train 1 epoch", "twin 1 epoch",
         "evaluate", "inspect")
CLASSES = 10
INSPECT_MAX_ROWS = 100_000  # rows: above this the inspect step is skipped (hours on a 2-core CPU at 1M)


def proc_mib(*keys: str) -> dict[str, int]:
    """Fields of this process's /proc/self/status (RssAnon, VmRSS, VmHWM, ...) in MiB: the
    in-process benchmarks' before/after readings."""
    with open("/proc/self/status") as fh:
        return {k: int(v.split()[0]) // 1024 for k, v in (line.split(":", 1) for line in fh) if k in keys}


def reset_peak() -> None:
    """Set this process's peak-RSS counter (VmHWM) to its current RSS (Linux >= 4.0), so the next
    reading of VmHWM is the peak of what ran since: a phase's own peak."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def write_rows(root: Path, start: int, stop: int, image: tuple[int, int, int] = (28, 28, 1)) -> list[Path]:
    """Rows start..stop-1: class i % 10, test when (i // 10) % 5 == 0; noise around a class
    level, so no two rows are equal (a duplicate would be a data-gate finding, not what this
    measures). ``image``: (height, width, channels). Returns the files written."""
    from PIL import Image

    for c in range(CLASSES):
        for split in ("train", "test"):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
    files = []
    for s0 in range(start, stop, 10000):  # in blocks: 1M rows of noise at once would be GBs
        rng = np.random.default_rng(s0)
        i = np.arange(s0, min(s0 + 10000, stop))
        imgs = np.clip(rng.normal(40 + 20 * (i % CLASSES)[:, None, None, None], 30, (len(i), *image)),
                       0, 255).astype(np.uint8)
        for k, img in zip(i, imgs):
            split = "test" if (k // CLASSES) % 5 == 0 else "train"
            files.append(root / split / f"c{k % CLASSES}" / f"{k:08d}.png")
            Image.fromarray(img[..., 0] if image[2] == 1 else img).save(files[-1], compress_level=1)
    return files


def workspace(rev: str, dest: Path, source: Path, overrides: list[str]) -> dict:
    """A fresh copy of ``rev`` with its params.yaml for ``source``; returns its dvc.yaml stages."""
    dest.mkdir(parents=True)
    tar = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    subprocess.run([sys.executable, "-m", "pipeline.config", "compose", "-o", "params.yaml", "data=imagefolder",
                    f"data.path={source}", "train.epochs=1", *overrides], cwd=dest, check=True, env=env_for(dest),
                   capture_output=True)
    return yaml.safe_load((dest / "dvc.yaml").read_text())["stages"]


def env_for(ws: Path) -> dict:
    env = dict(os.environ)
    # A user's checkout keeps the project's compiled modules in __pycache__ after its first run; a
    # box that sets PYTHONDONTWRITEBYTECODE (this sandbox does) recompiles them in every stage
    # process. Small (0.02 s median a process, bench/results/process_cost.log) but not a cost of
    # the data path.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{ws}/mlflow.db", POISONGATE_PROGRESS="0", PYTHONPATH=str(ws),
               PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    return env


def measure(argv: list[str], cwd: Path) -> dict:
    """Wall seconds, the peak memory (MiB) of the process tree and of its main process; rc and the
    stderr tail. The tree's memory is the sum of each process's PSS (proportional set size): a
    forked decode worker shares its parent's pages, and summing RSS would count them twice; both
    are sampled. ``peak_rss_mib`` is not: the kernel's peak RSS of the tree's largest process
    (``wait4``'s ``ru_maxrss``, file pages included), exact for a one-process stage."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env_for(cwd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0, 0]
    done = threading.Event()

    def sample() -> None:
        try:
            root = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    tree = [root, *root.children(recursive=True)]
                    peak[0] = max(peak[0], sum(p.memory_full_info().pss for p in tree if p.is_running()))
                    peak[1] = max(peak[1], root.memory_info().rss)
                except psutil.Error:
                    pass
                done.wait(0.02)
        except psutil.Error:
            pass

    t = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    t.start()
    err_parts: list[bytes] = []
    reader = threading.Thread(target=lambda: err_parts.append(proc.stderr.read()), daemon=True)
    reader.start()
    # wait4, not communicate: its rusage holds the kernel's own peak RSS (VmHWM) of the stage's
    # largest process. The sampler above reads smaps every ~20 ms or slower and misses short
    # spikes: a 1M-row train epoch at batch 512 sampled ~1.4 GB while /proc showed a VmHWM of 2.1.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    err = b"".join(err_parts)
    wall = time.perf_counter() - t0
    done.set()
    t.join()
    return {"seconds": round(wall, 2), "rss_mib": round(peak[0] / 2**20, 1), "main_rss_mib": round(peak[1] / 2**20, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # ru_maxrss: KiB on Linux
            "rc": proc.returncode,
            "error": err.decode(errors="replace").strip().splitlines()[-3:] if proc.returncode else []}


def stage_argv(stages: dict, name: str) -> list[str]:
    argv = shlex.split(stages[name]["cmd"])
    return [sys.executable, *argv[1:]] if argv[0] == "python" else argv


def run_version(rev: str, ws: Path, source: Path, n: int, overrides: list[str], say,
                image: tuple[int, int, int] = (28, 28, 1), last: str = STEPS[-1],
                inspect_max_rows: int = INSPECT_MAX_ROWS) -> dict:
    stages = workspace(rev, ws, source, overrides)
    out = {}

    def step(label: str, argv: list[str]) -> bool:
        if STEPS.index(label) > STEPS.index(last):
            return False  # past --last-step: this and what depends on it are not run
        r = measure(argv, ws)
        out[label] = r
        say(f"  {rev[:10]} N={n:>8} {label:<16} {r['seconds']:8.2f} s {r['rss_mib']:8.1f} MiB"
            + (f"  FAILED rc={r['rc']}: {r['error']}" if r["rc"] else ""))
        return r["rc"] == 0

    if not step("cold snapshot", stage_argv(stages, "snapshot")):
        return out
    appended = write_rows(source, n, n + n // 100, image)
    try:
        step("1% append", stage_argv(stages, "snapshot"))
        _rest(stages, ws, n, out, step, inspect_max_rows)
    finally:
        for f in appended:  # the source is shared by both versions: back to its N rows
            f.unlink(missing_ok=True)
    return out


def _rest(stages: dict, ws: Path, n: int, out: dict, step, inspect_max_rows: int) -> None:
    dvc = [str(Path(sys.executable).parent / "dvc")]
    subprocess.run([*dvc, "init", "--no-scm", "-f", "-q"], cwd=ws, env=env_for(ws), capture_output=True)
    subprocess.run([*dvc, "repro", "--single-item", "snapshot"], cwd=ws, env=env_for(ws), capture_output=True)
    step("no-op dvc repro", [*dvc, "repro", "--single-item", "snapshot"])
    if step("poison", stage_argv(stages, "poison")):
        if step("validate", stage_argv(stages, "validate")) and step("train 1 epoch", stage_argv(stages, "train")):
            # the fit alone, as the stage reports it: the rest of the stage is start-up and MLflow
            rep = json.loads((ws / "reports" / "train.json").read_text())
            out["train 1 epoch"]["fit_seconds"] = rep.get("train_seconds")
            if step("twin 1 epoch", stage_argv(stages, "twin")) and step("evaluate", stage_argv(stages, "evaluate")) \
                    and n <= inspect_max_rows:
                step("inspect", stage_argv(stages, "inspect"))


def machine() -> str:
    mem = psutil.virtual_memory().total / 2**30
    return f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, {mem:.0f} GiB, {platform.python_version()}"


def table(results: dict, old: str, new: str, sizes: list[int]) -> list[str]:
    def cell(r, k):
        return "—" if r is None else (f"failed (rc {r['rc']})" if r["rc"] else f"{r[k]:g}")

    def ratio(o, w, k):
        return f"{w[k] / o[k]:.2f}" if o and w and not o["rc"] and not w["rc"] and o[k] else "—"

    lines = ["| N | step | old s | new s | new/old time | old peak MiB | new peak MiB | new/old memory |",
             "|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        for s in STEPS:
            o, w = results[old].get(str(n), {}).get(s), results[new].get(str(n), {}).get(s)
            lines.append(f"| {n:,} | {s} | {cell(o, 'seconds')} | {cell(w, 'seconds')} | {ratio(o, w, 'seconds')} | "
                         f"{cell(o, 'rss_mib')} | {cell(w, 'rss_mib')} | {ratio(o, w, 'rss_mib')} |")
    lines += ["", "The 1% append as a share of the cold snapshot (issue 19 item 1: at most 10% at 100k):", "",
              "| N | old append/cold | new append/cold |", "|---|---|---|"]
    for n in sizes:
        shares = []
        for r in (old, new):
            c, a = (results[r].get(str(n), {}).get(s) for s in ("cold snapshot", "1% append"))
            shares.append(f"{a['seconds'] / c['seconds']:.1%}" if c and a and not c["rc"] and not a["rc"] else "—")
        lines.append(f"| {n:,} | {shares[0]} | {shares[1]} |")
    fits = [(n, results[r].get(str(n), {}).get("train 1 epoch", {}).get("fit_seconds")) for n in sizes for r in (old, new)]
    if any(f is not None for _, f in fits):
        lines += ["", "The train step's fit alone (`train_seconds` of reports/train.json; the rest of the step is the "
                  "process start-up, loading and MLflow logging, which the old code did with `mlflow.pytorch.log_model`):", "",
                  "| N | old fit s | new fit s |", "|---|---|---|"]
        for n in sizes:
            f = [results[r].get(str(n), {}).get("train 1 epoch", {}).get("fit_seconds") for r in (old, new)]
            lines.append(f"| {n:,} | {f[0] if f[0] is not None else '—'} | {f[1] if f[1] is not None else '—'} |")
    return lines


def plot(results: dict, old: str, new: str, sizes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, unit in ((axes[0], "seconds", "wall seconds"), (axes[1], "rss_mib", "peak memory (PSS of the tree), MiB")):
        for s, colour in zip(STEPS, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
            for rev, style in ((old, "--"), (new, "-")):
                pts = [(n, results[rev][str(n)][s][key]) for n in sizes
                       if s in results[rev].get(str(n), {}) and not results[rev][str(n)][s]["rc"]]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=colour, label=f"{s} ({'old' if rev == old else 'new'})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rows (N)")
        ax.set_ylabel(unit)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"data path at scale: old {old} (dashed) vs new {new} (solid)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000", help="rows, comma-separated (at 1000000 the epochs dominate: see --last-step)")
    ap.add_argument("--old", default="c901d6d", help="the revision to compare with (default: wave 1's last commit)")
    ap.add_argument("--new", default="HEAD")
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override for both versions")
    ap.add_argument("--new-override", action="append", default=[],
                    help="extra Hydra override for the new version only (a key the old code lacks)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed after)")
    ap.add_argument("--sources", default=None,
                    help="keep the generated sources here and reuse them on the next run (1M PNGs take minutes)")
    ap.add_argument("--image", default="28x28x1", help="height x width x channels of the generated images")
    ap.add_argument("--last-step", default=STEPS[-1], choices=STEPS,
                    help="stop each version after this step (a 1M-row epoch on a 2-core box is ~25 min)")
    ap.add_argument("--old-last-step", default=None, choices=(*STEPS, "none"),
                    help="the same for the old version only; none = do not run it (a new-only re-measure)")
    ap.add_argument("--inspect-max-rows", type=int, default=INSPECT_MAX_ROWS,
                    help="run the inspect step only up to this N (its k-fold fits at 1M rows on a CPU take hours)")
    ap.add_argument("--keep-workspaces", action="store_true",
                    help="leave each workspace (WORK/ws-N-REV) for bench/stage_memory.py; needs --work. The 1%% "
                         "append's files leave the shared source after the run: write them back (write_rows(source, "
                         "N, N + N//100, image)) before a no-op snapshot there, else it is refused as rows vanished")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scale"))
    ap.add_argument("--replay", default=None,
                    help="write the table from the cell lines a run printed (its stdout), e.g. of a run stopped "
                         "before its last size; no stage is run. Only what those lines carry: seconds and peak MiB")
    args = ap.parse_args()
    if args.replay:
        return replay(args)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.keep_workspaces and not args.work:
        ap.error("--keep-workspaces needs --work (the default scratch folder is removed at the end)")
    image = tuple(int(x) for x in args.image.lower().split("x"))
    if len(image) != 3 or image[2] not in (1, 3):
        ap.error(f"--image {args.image}: expected HxWxC with C 1 or 3, e.g. 28x28x1")
    revs = {r: subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", r], check=True, capture_output=True,
                              text=True).stdout.strip() for r in (args.old, args.new)}
    old, new = revs[args.old], revs[args.new]
    scratch = Path(args.work or tempfile.mkdtemp(prefix="pg-scale-"))
    say = lambda m: print(m, flush=True)  # noqa: E731
    results: dict = {old: {}, new: {}}
    t0 = time.time()
    try:
        for n in sizes:
            keep = Path(args.sources) if args.sources else None
            source = (keep or scratch) / f"src-{n}-{args.image}"
            if not (keep and (source / ".complete").is_file()):
                shutil.rmtree(source, ignore_errors=True)
                t = time.perf_counter()
                write_rows(source, 0, n, image)
                (source / ".complete").write_text("")
                say(f"N={n}: wrote {n} PNGs in {time.perf_counter() - t:.1f} s")
            for rev in (old, new):
                ws = scratch / f"ws-{n}-{rev}"
                shutil.rmtree(ws, ignore_errors=True)
                extra = args.override + (args.new_override if rev == new else [])
                last = args.old_last_step if rev == old and args.old_last_step else args.last_step
                if last == "none":
                    continue
                results[rev][str(n)] = run_version(rev, ws, source, n, extra, say, image, last, args.inspect_max_rows)
                if not args.keep_workspaces:
                    shutil.rmtree(ws, ignore_errors=True)
            if not keep:
                shutil.rmtree(source, ignore_errors=True)
            write_results(args, results, old, new, sizes, time.time() - t0, say)
    finally:
        if not args.work:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


CELL = re.compile(r"^  (\w+) N=\s*(\d+) (.+?)\s+([\d.]+) s\s+([\d.]+) MiB(?:  FAILED rc=(\d+).*)?$")


def replay(args) -> int:
    """``--replay LOG``: the results of the cells a run printed, as that run would have written them."""
    results: dict = {}
    revs: list[str] = []
    for line in Path(args.replay).read_text().splitlines():
        m = CELL.match(line)
        if m is None or m.group(3) not in STEPS:
            continue
        rev, n, step = m.group(1), m.group(2), m.group(3)
        if rev not in revs:
            revs.append(rev)
        results.setdefault(rev, {}).setdefault(n, {})[step] = {
            "seconds": float(m.group(4)), "rss_mib": float(m.group(5)), "rc": int(m.group(6) or 0), "error": []}
    if len(revs) != 2:
        raise SystemExit(f"{args.replay}: expected the cells of two revisions (old, new), found {revs}")
    old, new = revs
    sizes = sorted({int(n) for r in results.values() for n in r})
    args.sizes = ",".join(map(str, sizes))
    write_results(args, results, old, new, sizes, 0.0, print, note=f"Replayed from the cell lines of `{args.replay}` "
                  "(`--replay`): the run's printed seconds and peak MiB; its fit seconds and main-process RSS "
                  "were not printed, so they are not here.")
    return 0


def write_results(args, results: dict, old: str, new: str, sizes: list[int], seconds: float, say=print,
                  note: str = "") -> None:
    """The JSON, the plot and the table of what has run so far (called after every size)."""
    done = [n for n in sizes if str(n) in results[new] or str(n) in results[old]]
    minutes = seconds / 60
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"old": old, "new": new, "sizes": done, "machine": machine(),
                                                    "minutes": round(minutes, 1), "results": results}, indent=1))
    plot(results, old, new, done, out.with_suffix(".png"))
    cmd = (f"python bench/scale.py --replay {args.replay} --out {args.out}" if args.replay else
           f"python bench/scale.py --sizes {args.sizes} --image {args.image} --old {args.old} --new {args.new}")
    md = [f"# The data path at scale: {old} (old) against {new} (new)", "",
          f"`{cmd}"
          + "".join(f" --override {o}" for o in args.override)
          + "".join(f" --new-override {o}" for o in args.new_override)
          + (f" --last-step '{args.last_step}'" if args.last_step != STEPS[-1] else "")
          + (f" --inspect-max-rows {args.inspect_max_rows}" if args.inspect_max_rows != INSPECT_MAX_ROWS else "")
          + (f" --old-last-step '{args.old_last_step}'" if args.old_last_step else "") + "`", "",
          f"Machine: {machine()}; 1 trial per cell; {'replayed' if args.replay else f'{minutes:.1f} min in all'}. Sources: {args.image} PNGs (HxWxC), 10 classes, "
          "20% test; the append adds N/100 files. Peak memory is the whole process tree's (stage + decode "
          "workers, the sum of their PSS: shared pages counted once), sampled every 20 ms; the main process's "
          "own peak RSS is in the JSON (`main_rss_mib`). See the script's docstring for what each step runs. "
          "— = not run (past --last-step / --old-last-step).", *(["", note] if note else []), "",
          *table(results, old, new, done), "", f"![time and memory against N]({out.with_suffix('.png').name})", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    say("\n".join(md))


if __name__ == "__main__":
    raise SystemExit(main())
