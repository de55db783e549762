"""Two gates racing to move `champion`: real concurrency between two OS processes released by a
barrier, repeated, against mlflow server on PostgreSQL and against a shared sqlite file (the
default store of `make run`).

1. The lock's atomic step: in every round both processes try to take the lock at once and hold
   it until the round ends; exactly one gets it, the other sees it held, named by its holder.
2. ``pipeline.tracking.registry.promote``: in every round both processes promote their own version against
   the same previous champion; exactly one moves the alias, the other waits for the lock,
   re-reads the alias, finds it moved and raises PromotionConflict (fails closed); nothing of
   the loser is tagged as passed.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback

import pytest

ROUNDS = 8  # per phase; each round is ~10 registry requests (~0.1-0.3 s on 2 busy cores)
BARRIER_TIMEOUT_S = 120  # a spawned child imports mlflow (~3-7 s on 2 busy cores)


def _racer(uri: str, model: str, me: int, versions: list[str], barrier, out) -> None:
    """One promoter process: phase 1 (raw lock), then phase 2 (promote)."""
    try:
        from mlflow import MlflowClient

        from pipeline.tracking import registry as promote
        from pipeline.tracking import lock as rl

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        holder = f"racer-{me}"
        for r in range(ROUNDS):
            barrier.wait(BARRIER_TIMEOUT_S)
            try:
                info = rl.acquire(client, model, holder=holder, wait_s=0)
                got, held_by = True, None
            except rl.LockHeld as exc:
                info, got, held_by = None, False, exc.info.holder
            barrier.wait(BARRIER_TIMEOUT_S)  # the winner holds the lock until both have tried
            if info is not None:
                assert rl.release(client, info)
            out.put(("lock", r, me, got, held_by))
            barrier.wait(BARRIER_TIMEOUT_S)
        for r in range(ROUNDS):
            previous = promote.champion_version(client, model)  # the baseline both were compared with
            barrier.wait(BARRIER_TIMEOUT_S)
            t0 = time.monotonic()
            try:
                promote.promote(client, model, versions[r], previous, f"sha-{versions[r]}")
                outcome = ("won", "")
            except promote.PromotionConflict as exc:
                outcome = ("conflict", str(exc))
            except Exception as exc:  # anything else is a test failure, reported by the parent
                outcome = ("error", f"{type(exc).__name__}: {exc}")
            out.put(("promote", r, me, outcome[0], outcome[1], previous, versions[r], time.monotonic() - t0))
            barrier.wait(BARRIER_TIMEOUT_S)
    except Exception:
        out.put(("crash", -1, me, traceback.format_exc()))
        barrier.abort()


def _race(uri: str, model: str) -> list[tuple]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(model)
    # A server accepts a version only with a source inside its run's artifacts; nothing is uploaded.
    run = client.create_run(client.get_experiment_by_name("Default").experiment_id)
    versions = [[], []]
    for _ in range(ROUNDS):
        for me in (0, 1):
            mv = client.create_model_version(model, source=f"{run.info.artifact_uri}/racer{me}", run_id=run.info.run_id)
            versions[me].append(str(mv.version))
    ctx = mp.get_context("spawn")  # fresh interpreters: no state forked from pytest
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(uri, model, me, versions[me], barrier, out)) for me in (0, 1)]
    for p in procs:
        p.start()
    results = []
    try:
        expected = 2 * ROUNDS * 2
        deadline = time.monotonic() + BARRIER_TIMEOUT_S + 60 * ROUNDS
        while len(results) < expected:
            item = out.get(timeout=max(1.0, deadline - time.monotonic()))
            if item[0] == "crash":
                raise AssertionError(f"racer {item[2]} crashed:\n{item[3]}")
            results.append(item)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return results


def _check(uri: str, model: str, results: list[tuple]) -> None:
    from mlflow import MlflowClient

    from pipeline.tracking import registry as promote
    from pipeline.tracking import lock as rl

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    locks = [r for r in results if r[0] == "lock"]
    for r in range(ROUNDS):
        rows = sorted((x for x in locks if x[1] == r), key=lambda x: x[2])
        assert [x[3] for x in rows].count(True) == 1, f"round {r}: lock taken by {[x[3] for x in rows]}"
        loser = next(x for x in rows if not x[3])
        assert loser[4] == f"racer-{1 - loser[2]}", f"round {r}: LockHeld names {loser[4]!r}"

    promos = [r for r in results if r[0] == "promote"]
    champion = None
    for r in range(ROUNDS):
        rows = [x for x in promos if x[1] == r]
        assert sorted(x[3] for x in rows) == ["conflict", "won"], f"round {r}: {rows}"
        won = next(x for x in rows if x[3] == "won")
        lost = next(x for x in rows if x[3] == "conflict")
        # Both were compared with the same champion; the loser re-read the alias and saw the winner.
        assert won[5] == lost[5] == champion
        assert f"to v{won[6]}" in lost[4], lost[4]
        assert client.get_model_version(model, won[6]).tags[promote.TAG_VERDICT] == "passed"
        assert promote.TAG_VERDICT not in client.get_model_version(model, lost[6]).tags
        champion = won[6]
    assert promote.champion_version(client, model) == champion
    assert rl.read_lock(client, model) is None  # released: no lock model left behind
    leftovers = [m.name for m in client.search_registered_models(f"name LIKE '{model}.%'")]
    assert leftovers == [], leftovers


def test_race_on_postgres_server(team_server, unique_name):
    results = _race(team_server.url, unique_name)
    _check(team_server.url, unique_name, results)


def test_race_on_sqlite_file(sqlite_uri):
    results = _race(sqlite_uri, "race-sqlite")
    _check(sqlite_uri, "race-sqlite", results)


def test_stale_lock_is_broken_and_a_live_one_names_its_holder(sqlite_uri):
    """A crashed holder's lock blocks until it expires, then the next promoter takes it over."""
    from mlflow import MlflowClient

    from pipeline.tracking import lock as rl

    client = MlflowClient(tracking_uri=sqlite_uri, registry_uri=sqlite_uri)
    crashed = rl.acquire(client, "m", holder="ci-job-41 (crashed)", ttl_s=1.5, wait_s=0)
    with pytest.raises(rl.LockHeld, match=r"held by ci-job-41 \(crashed\) since .*expires"):
        rl.acquire(client, "m", holder="ci-job-42", wait_s=0)
    time.sleep(1.6)
    with rl.promotion_lock(client, "m", holder="ci-job-42", wait_s=0) as lock:
        assert lock.broke_stale and lock.holder == "ci-job-42"
        assert rl.read_lock(client, "m").token == lock.token
        # The crashed holder comes back late: its release must not delete job 42's lock.
        assert rl.release(client, crashed) is False
        assert rl.read_lock(client, "m").token == lock.token
    assert rl.read_lock(client, "m") is None
    # A body that outlives its ttl and loses the lock is an error, not a silent success.
    with pytest.raises(rl.LockError, match="expired while held"):
        with rl.promotion_lock(client, "m", holder="slow", ttl_s=0.5, wait_s=0):
            time.sleep(0.6)
            rl.acquire(client, "m", holder="next", wait_s=0)  # breaks the expired lock
    with pytest.raises(ValueError, match="ttl_s must be > 0"):
        rl.acquire(client, "m", ttl_s=0)
