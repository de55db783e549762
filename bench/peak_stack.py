"""Where a stage's resident memory peaks: run a module in-process, sample its RSS every 10 ms, and
print the peak with the main thread's stack there, plus every rise of more than ``JUMP_MIB`` MiB
(default 30) with its stack (issue 19 item 3: how inspect's peak was found in k-fold's predictions).

    cd WORKSPACE && PYTHONPATH=<this checkout> python <this checkout>/bench/peak_stack.py pipeline.inspect <the stage's args>

Run as a script, so the module comes from PYTHONPATH, not from a ``pipeline/`` in the working
directory (``python -m`` would put that first). Output on stderr; ``DEPTH`` frames a stack
(default 9). Main-process RSS (file pages of the loaded libraries included), not the tree's PSS.
"""

from __future__ import annotations

import os
import runpy
import sys
import threading
import time
import traceback

import psutil


def main() -> int:
    mod = sys.argv[1]
    sys.argv = [mod] + sys.argv[2:]
    proc = psutil.Process()
    main_id = threading.get_ident()
    depth, jump = int(os.environ.get("DEPTH", 9)), float(os.environ.get("JUMP_MIB", 30)) * 2**20
    peak, last, jumps = [0, None], [0], []
    t0 = time.time()
    stop = threading.Event()

    def stack(frame) -> str:
        st = traceback.extract_stack(frame)[-depth:]
        return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}" for f in reversed(st))

    def sample() -> None:
        while not stop.is_set():
            rss = proc.memory_info().rss
            frame = sys._current_frames().get(main_id)
            if rss > peak[0]:
                peak[0], peak[1] = rss, stack(frame) if frame else None
            if rss - last[0] > jump:
                jumps.append((time.time() - t0, (rss - last[0]) / 2**20, rss / 2**20, stack(frame) if frame else ""))
                last[0] = rss
            elif rss < last[0]:
                last[0] = rss
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = 0
    try:
        runpy.run_module(mod, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        rc = e.code or 0
    stop.set()
    th.join()
    print(f"rc={rc} peak {peak[0] / 2**20:.1f} MiB at: {peak[1]}", file=sys.stderr)
    for t, d, r, s in jumps:
        print(f"  t={t:6.1f}s +{d:6.1f} -> {r:7.1f} MiB  {s}", file=sys.stderr)
    return int(rc) if isinstance(rc, int) else 1


if __name__ == "__main__":
    raise SystemExit(main())
