"""A mutual-exclusion lock built on the MLflow model registry, for moving the `champion` alias.

MLflow has no compare-and-set on aliases: two gates that both re-read `champion`, see the version
they were compared against, and then set it, can both "win" (the second silently replaces the
first). What the registry does make atomic is creating a registered model: the name is the
table's key (unique per workspace), so of two concurrent ``create_registered_model`` calls with
the same name exactly one commits and the other gets ``RESOURCE_ALREADY_EXISTS``. This was checked
against ``mlflow server`` on PostgreSQL and on a shared sqlite file by
tests/team/test_promotion_race.py (two OS processes released by a barrier, many rounds).

So the lock is a registered model named ``<model>.promotion-lock``: creating it acquires the lock,
deleting it releases it. It exists only for the sub-second promotion, so it is not normally seen
in the UI. Its tags say who holds it (user@host pid, or ``holder=``), since when, and until when;
a lock past its expiry (a holder that crashed) is broken by the next caller. Whoever holds the
lock must re-read the alias inside it and refuse if it moved (``gates.promote.promote`` does).

Deleting is the delicate step: a registry delete is by name, not by owner, so "check the lock is
mine/stale, then delete it" could delete a newer lock taken in between. Every delete of the lock
with token T therefore first creates the marker model ``<lock>.release-<T>`` (atomic as above):
only the marker's creator may delete a lock that still carries token T, and it re-reads the
lock after winning the marker. Lock T can disappear only through the holder of marker T, so the
re-read cannot go stale before the delete. The marker is deleted right after.

Limits (said in docs/team.md): it excludes only promoters that take this lock (a person moving
the alias in the UI is not stopped); expiry compares the holder's clock, written in the tag,
with the reader's, so clocks must agree to well within ``ttl_s``; a process that crashes while
holding a release marker (a window of two requests) leaves that lock for a person to delete.
"""

from __future__ import annotations

import getpass
import os
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

LOCK_SUFFIX = ".promotion-lock"
RELEASE_SUFFIX = ".release-"
TAG_TOKEN = "poisongate.lock.token"
TAG_HOLDER = "poisongate.lock.holder"
TAG_ACQUIRED = "poisongate.lock.acquired"  # epoch seconds, holder's clock
TAG_EXPIRES = "poisongate.lock.expires"  # epoch seconds, holder's clock
# A promotion is three registry calls (re-read, tag, alias): well under a second; with the
# gate's HTTP limits (15 s timeout, 1 retry) at most ~90 s on a struggling server. 300 s
# leaves room for that and for clock skew between machines (NTP keeps it under a second).
DEFAULT_TTL_S = 300.0
# How long a second promoter waits for the lock before giving up (it then fails closed). Long
# enough to outlast a normal promotion, so the loser of a race reaches the re-read of the alias
# and fails with "champion moved" rather than "lock held".
DEFAULT_WAIT_S = 60.0
POLL_S = 0.2  # between attempts while waiting; a promotion takes ~10-50 ms per request
# Lock gone again before we could read it, in a row: normal a few times under contention; this
# many means the store refuses the create for another reason.
MAX_VANISHED = 100


class LockError(RuntimeError):
    """The promotion lock could not be taken or released; nothing was promoted."""


class LockHeld(LockError):
    """Another promoter holds the lock (the message names it and its expiry)."""

    def __init__(self, info: "LockInfo", waited_s: float):
        self.info = info
        self.waited_s = waited_s
        head = (f"promotion lock {info.name} is held by {info.holder} since {_iso(info.acquired_s)} "
                f"(expires {_iso(info.expires_s)}); waited {waited_s:.1f} s. ")
        if info.expired() and info.token:
            tail = ("It has expired but another caller is releasing it, or a release was interrupted: "
                    f"if this persists, delete the registered models {info.name!r} and "
                    f"{info.name + RELEASE_SUFFIX + info.token!r} by hand (MlflowClient().delete_registered_model).")
        else:
            tail = ("Another gate is promoting: re-run this gate when it is done. If that holder is gone, the "
                    f"lock is broken automatically after its expiry, or delete the registered model {info.name!r} "
                    "by hand (MlflowClient().delete_registered_model).")
        super().__init__(head + tail)


@dataclass(frozen=True)
class LockInfo:
    name: str  # the lock's registered-model name
    token: str  # unique per acquisition
    holder: str
    acquired_s: float
    expires_s: float
    waited_s: float = 0.0  # how long the acquirer waited for it (0: free at once)
    broke_stale: bool = False  # the acquirer first broke an expired lock

    def expired(self, now: Optional[float] = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_s


def lock_name(model_name: str) -> str:
    return f"{model_name}{LOCK_SUFFIX}"


def default_holder() -> str:
    """``user@host pid N``; CI job ids can be added by passing ``holder=``."""
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


def _iso(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


def _error_code(exc: BaseException) -> Optional[str]:
    return getattr(exc, "error_code", None)


def _create(client: Any, name: str, tags: dict[str, str], description: str) -> bool:
    """Create the registered model ``name``; False when another caller's create won (the
    atomic step)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, tags=tags, description=description)
        return True
    except MlflowException as exc:
        # RESOURCE_DOES_NOT_EXIST also means we lost: on the unique-key violation MLflow's SQL
        # store looks the existing model up to word its error, and when the winner has already
        # deleted it again that lookup fails (seen in tests/team/test_promotion_race.py, on
        # sqlite and on PostgreSQL; mlflow 3.17 sqlalchemy_store.create_registered_model).
        if _error_code(exc) in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
            return False
        raise


def read_lock(client: Any, model_name: str) -> Optional[LockInfo]:
    """The current lock of ``model_name``, or None when it is free."""
    from mlflow.exceptions import MlflowException

    name = lock_name(model_name)
    try:
        rm = client.get_registered_model(name)
    except MlflowException as exc:
        if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    tags = dict(rm.tags or {})
    try:
        return LockInfo(name, tags[TAG_TOKEN], tags.get(TAG_HOLDER, "?"), float(tags[TAG_ACQUIRED]), float(tags[TAG_EXPIRES]))
    except (KeyError, ValueError):
        # Tags not (yet) readable: a model of that name made by something else, or a lock read
        # mid-creation on a store without transactions. Treat it as held until its own
        # creation time + the default expiry (server clock).
        created = (rm.creation_timestamp or 0) / 1000.0
        return LockInfo(name, "", tags.get(TAG_HOLDER, "unknown (untagged registered model)"), created, created + DEFAULT_TTL_S)


def _delete_if_token(client: Any, model_name: str, token: str) -> bool:
    """Delete the lock only if it still carries ``token`` (see the module docstring); True if
    this call deleted it. False when it is gone, re-taken, or another caller is deleting it."""
    from mlflow.exceptions import MlflowException

    name = lock_name(model_name)
    marker = f"{name}{RELEASE_SUFFIX}{token}"
    if not _create(client, marker, {TAG_TOKEN: token, TAG_HOLDER: default_holder()},
                   f"poisongate: release of promotion lock {name} token {token} in progress"):
        return False
    try:
        current = read_lock(client, model_name)
        if current is None or current.token != token:
            return False
        try:
            client.delete_registered_model(name)
        except MlflowException as exc:
            if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True
    finally:
        client.delete_registered_model(marker)


def acquire(client: Any, model_name: str, holder: Optional[str] = None, ttl_s: float = DEFAULT_TTL_S,
            wait_s: float = DEFAULT_WAIT_S, poll_s: float = POLL_S) -> LockInfo:
    """Take the promotion lock of ``model_name``; wait up to ``wait_s`` while another live
    holder has it, break it once it is past its expiry. Raises :class:`LockHeld` on timeout."""
    if ttl_s <= 0 or wait_s < 0 or poll_s <= 0:
        raise ValueError(f"ttl_s must be > 0, wait_s >= 0, poll_s > 0 (got {ttl_s}, {wait_s}, {poll_s})")
    name = lock_name(model_name)
    holder = holder or default_holder()
    start = time.monotonic()
    broke = False
    vanished = 0
    while True:
        token = uuid.uuid4().hex
        now = time.time()
        tags = {TAG_TOKEN: token, TAG_HOLDER: holder, TAG_ACQUIRED: f"{now:.3f}", TAG_EXPIRES: f"{now + ttl_s:.3f}"}
        desc = (f"poisongate promotion lock for {model_name}: held by {holder} since {_iso(now)}, "
                f"expires {_iso(now + ttl_s)}. Deleted when the promotion ends.")
        if _create(client, name, tags, desc):
            return LockInfo(name, token, holder, now, now + ttl_s, time.monotonic() - start, broke)
        current = read_lock(client, model_name)
        if current is None:  # released between our create and our read: try again at once
            vanished += 1
            if vanished > MAX_VANISHED:
                raise LockError(f"creating {name} keeps failing although no such model exists: check the registry")
            continue
        if current.expired() and current.token and _delete_if_token(client, model_name, current.token):
            broke = True
            continue
        # Held, or expired while another caller is releasing it: wait like for a held lock.
        waited = time.monotonic() - start
        if waited >= wait_s:
            raise LockHeld(current, waited)
        time.sleep(min(poll_s, max(0.0, wait_s - waited)))


def release(client: Any, info: LockInfo) -> bool:
    """Release a lock taken by :func:`acquire`; False when it was no longer ours (it expired
    and was broken), which the caller should report: its promotion may have overlapped."""
    model_name = info.name[: -len(LOCK_SUFFIX)]
    return _delete_if_token(client, model_name, info.token)


@contextmanager
def promotion_lock(client: Any, model_name: str, holder: Optional[str] = None, ttl_s: float = DEFAULT_TTL_S,
                   wait_s: float = DEFAULT_WAIT_S, poll_s: float = POLL_S) -> Iterator[LockInfo]:
    """``with promotion_lock(client, name) as lock:`` re-read the alias, then move it.

    Releases on exit, also when the body raises. A lock that was broken while held (the body
    ran past ``ttl_s``) raises :class:`LockError` on exit, since exclusion was not guaranteed.
    """
    info = acquire(client, model_name, holder=holder, ttl_s=ttl_s, wait_s=wait_s, poll_s=poll_s)
    try:
        yield info
    except BaseException:
        try:
            release(client, info)
        except Exception:
            pass  # the body's error is the one to report; an unreleased lock expires
        raise
    else:
        if not release(client, info):
            raise LockError(
                f"promotion lock {info.name} expired while held by {info.holder} (ttl {ttl_s:.0f} s) and was "
                "taken by another promoter: check the `champion` alias and its history in the registry")
