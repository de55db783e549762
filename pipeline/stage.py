"""One stage runner: argument parsing, the single config load, and the error -> exit code map.

Every stage module is ``run(cfg, paths) -> report`` plus a two-line ``main`` that calls
:func:`main` here with its path arguments. The runner parses ``--params`` and the stage's paths,
loads the config once, calls ``run``, and turns every failure into ``error: <message>``
on stderr and a non-zero exit:

- 0: the stage did its work (for the gate: the release passed);
- 1: a check failed or the data/model was refused (integrity, lineage, data gate, release gate);
- 2: anything else: bad config or input, a missing file, an unreachable tracking server, a bug.

Fail closed: an unexpected exception also exits 2, with its traceback (it is a bug to report).
The error classes themselves live in ``pipeline.errors`` (standard library only), so the schema,
the data layer and the core raise them without importing this runner.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from pipeline.console import progress_bar, progress_enabled, say  # noqa: F401 - the stages' toolkit
from pipeline.errors import CheckFailed, UserError, redact  # noqa: F401 - defined apart, raised everywhere

EXIT_CODES = """exit codes:
  0  done (gate: release passed)
  1  a check failed or the input was refused (integrity, lineage, data gate, release gate)
  2  bad config or input, missing file, tracking server unreachable, or an unexpected error"""


@dataclass(frozen=True)
class PathArg:
    """A ``--<name>`` path option of a stage (dvc.yaml passes every one on the cmd line)."""

    name: str
    help: str
    required: bool = True
    default: Optional[str] = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def build_parser(stage: str, doc: Optional[str], paths: Sequence[PathArg],
                 extra: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"python -m pipeline.{stage}", description=doc, epilog=EXIT_CODES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="the composed config (default: params.yaml)")
    for p in paths:
        ap.add_argument(p.flag, dest=p.name, required=p.required and p.default is None, default=p.default,
                        help=p.help)
    if extra is not None:
        extra(ap)
    return ap


def describe_oserror(exc: OSError) -> str:
    """``<path>: <reason>`` for an OSError, naming the file even when the OS did not (disk full)."""
    path = exc.filename or getattr(exc, "poisongate_path", None) or "(path unknown)"
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = " (free disk space, then re-run)" if getattr(exc, "errno", None) == 28 else ""
    return f"{path}: {reason}{hint}"


def exit_code_of(exc: BaseException) -> tuple[int, str]:
    """The exit code and the one-line message of a failure (see the module docstring)."""
    if isinstance(exc, UserError):
        return exc.exit_code, f"{exc.prefix}{exc}"
    if isinstance(exc, OSError):
        return 2, describe_oserror(exc)
    if type(exc).__module__.startswith("pipeline.core"):  # the core's input errors (AttackError, ...)
        return 2, str(exc)
    if type(exc).__module__.startswith("mlflow"):
        return 2, f"MLflow: {exc}: is the tracking server up and MLFLOW_TRACKING_URI right? Nothing was promoted"
    return 2, f"unexpected {type(exc).__name__}: {exc}"


def main(stage: str, run: Callable[[Any, argparse.Namespace], Any], paths: Sequence[PathArg],
         argv: Optional[Sequence[str]] = None, doc: Optional[str] = None,
         extra: Optional[Callable[[argparse.ArgumentParser], None]] = None,
         load_config: bool = True) -> int:
    """Parse, load the config once, run; map failures to exit codes. ``run(cfg, args)``."""
    code = _main(stage, run, paths, argv, doc, extra, load_config)
    if code == 0 and _own_process(stage):
        # The process ends right after this returns. At exit the interpreter runs full garbage
        # collections over every object the libraries made (pandas, pyarrow): ~0.2 s, ~8% of a 1%
        # append at 100k (bench/process_cost.py; issue 19 item 1). A finished stage has no use for
        # cycle collection: frozen objects are skipped by it, while atexit handlers, stream flushing
        # and module teardown still run. Not on a failure: there a cycle's finalizer (a traceback
        # holding a temporary file) may still have cleaning up to do, and time does not matter.
        gc.freeze()
    return code


def _main(stage: str, run: Callable[[Any, argparse.Namespace], Any], paths: Sequence[PathArg],
          argv: Optional[Sequence[str]], doc: Optional[str],
          extra: Optional[Callable[[argparse.ArgumentParser], None]], load_config: bool) -> int:
    args = build_parser(stage, doc, paths, extra).parse_args(argv)
    start = time.time()
    start_boot = _boot_clock()
    try:
        cfg = None
        if load_config:
            from pipeline import config

            cfg = config.load(args.params)
        run(cfg, args)
    except KeyboardInterrupt:
        print(f"error: {stage} interrupted; nothing was promoted", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - the runner is the one place that maps every failure
        code, message = exit_code_of(exc)
        print(f"error: {redact(message)}", file=sys.stderr, flush=True)
        if message.startswith("unexpected ") and os.environ.get("POISONGATE_TRACEBACK", "1") != "0":
            print(redact("".join(traceback.format_exception(exc))), file=sys.stderr)
        return code
    _say_elapsed(stage, start, start_boot)
    return 0


_HEAP_MAPPED = False  # map_heap's setting was taken in this process


def map_heap(stage: str, mib: int) -> bool:
    """``core.heap.map_large(mib MiB)`` when this stage is its own process (``data.heap_map_mib``;
    0 leaves glibc's default). Only then: the setting lasts for the rest of the process and cannot
    be undone, so a test or a notebook that calls the stage in-process keeps its allocator as it
    was. True when the setting was taken."""
    global _HEAP_MAPPED
    if not mib or not _own_process(stage):
        return False
    from pipeline.core import heap

    # the trim threshold at twice the map threshold, as glibc's own adaptation keeps it (map_large)
    _HEAP_MAPPED = heap.map_large(int(mib) * 2**20, 2 * int(mib) * 2**20) or _HEAP_MAPPED
    return _HEAP_MAPPED


def relax_heap() -> bool:
    """After :func:`map_heap`: from here on only blocks of 32 MiB or more get their own mapping,
    where glibc's adaptive threshold ends up after a few large frees. For a phase that allocates
    and frees many blocks of 1-32 MiB, where mapping and zero-filling each afresh costs time (the
    snapshot stage's read, plan and data-gate columns: +8% to +32% on a 1% append at 1M rows,
    bench/results/data_stages_map_large_1m.log; clean_label's crafting in the poison stage). A
    no-op (returns False) when map_heap was not taken."""
    if not _HEAP_MAPPED:
        return False
    from pipeline.core import heap

    return heap.map_large(heap.MAP_LARGE_MAX_BYTES, 2 * heap.MAP_LARGE_MAX_BYTES)


def _own_process(stage: str) -> bool:
    """True when this stage is the process (``python -m pipeline.<stage>``), not a call from a test."""
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(main_spec, "name", None) == f"pipeline.{stage}"


def _boot_clock() -> Optional[float]:
    clock = getattr(time, "CLOCK_BOOTTIME", None)  # Linux
    return None if clock is None else time.clock_gettime(clock)


def _startup_seconds(start: float, start_boot: Optional[float]) -> Optional[float]:
    """Seconds from this process's start to ``start``. On Linux: the kernel's start time of the
    process (/proc/self/stat, clock ticks since boot) against the boot clock. psutil's
    ``create_time`` adds the boot time, which Linux gives in whole seconds: it said 1.6-1.8 s for
    a 0.7 s start-up. Elsewhere psutil's figure."""
    try:
        if start_boot is not None:
            with open("/proc/self/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()  # after "(comm)": field 3 onwards
            return max(0.0, start_boot - int(fields[19]) / os.sysconf("SC_CLK_TCK"))  # field 22, starttime
        import psutil  # an mlflow dependency; without it only the stage's own time is said

        return max(0.0, start - psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - timing is informational, never a failure
        return None


def _say_elapsed(stage: str, start: float, start_boot: Optional[float] = None) -> None:
    """``<stage>: done in N s (M s before the stage began)``: the start-up share (interpreter and
    library imports) is most of a digits stage, so a slow run says which part was slow."""
    now = time.time()
    boot = _startup_seconds(start, start_boot) if _own_process(stage) else None
    extra = "" if boot is None else f" ({boot:.1f} s start-up before it)"
    print(f"{stage}: done in {now - start:.1f} s{extra}", file=sys.stderr, flush=True)
