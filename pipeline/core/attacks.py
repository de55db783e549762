"""Data-poisoning attacks as pure array functions (numpy only; no torch, no I/O).

Two attacks act on the *train* split arrays handed in (the caller never hands in test rows):

- ``label_flip``: ``rate`` of the source-class rows relabelled ``target`` (pixels untouched);
- ``backdoor``: a trigger stamped on ``rate`` of the source rows (of every non-target row when
  ``source`` is None: all-to-one), which are relabelled ``target``.

Triggers (``apply_trigger``) are shared with the evaluate stage, which stamps the scan triggers
on clean test images to measure the attack success rate. A trigger spec is a plain dict
``{kind, size, location, pattern, alpha, seed}``:

- ``kind: patch``: a ``size`` x ``size`` square at ``location`` (``top_left``, ``top_right``,
  ``bottom_left``, ``bottom_right``, ``center``, ``random``, or a concrete ``[y, x]`` of its top-left
  pixel) filled with ``pattern`` (``white``, ``black``, ``checker``, ``noise``: seeded uniform);
- ``kind: blend``: the whole image mixed with a fixed full-size pattern, ``(1 - alpha) * image +
  alpha * pattern`` (``pattern``: ``noise`` (seeded uniform) or ``checker``), or with a caller's
  image via :func:`blend`.

Everything is deterministic for a spec: noise comes from ``numpy.random.default_rng(seed)``,
``random`` locations are drawn by :func:`resolve_locations` from the same seed and recorded as
concrete ``[y, x]`` before anything is written (a record never says "random").
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.core.hashing import sample_hash

# The names are the config schema's (one list each; the schema is standard library only).
from pipeline.schema import (  # noqa: E402,F401
    ATTACK_NAMES, BLEND_PATTERNS, LOCATIONS, NAMED_LOCATIONS, PATCH_PATTERNS, TRIGGER_KINDS,
)

TRIGGER_KEYS = ("kind", "size", "location", "pattern", "alpha", "seed")


class AttackError(ValueError):
    """An attack or trigger specification the pipeline refuses (the message says how to fix it)."""


# --------------------------------------------------------------------------- classes


def resolve_class(value: Any, class_names: Sequence[str]) -> int:
    """Class index of ``value``: an int, a numeric string (``"7"``) or a class name (``"truck"``).

    A class *name* wins over a numeric reading, so a data set whose classes are called ``"0"..
    "9"`` (digits) maps ``"7"`` to the class named ``"7"``.
    """
    names = [str(c) for c in class_names]
    n = len(names)
    if value is None:
        raise AttackError("a class is required here, got null")
    if isinstance(value, (bool, np.bool_)):
        raise AttackError(f"class {value!r} is a boolean; give a class name or an index 0..{n - 1}")
    if isinstance(value, (int, np.integer)):
        idx = int(value)
    elif isinstance(value, (float, np.floating)) and float(value).is_integer():
        idx = int(value)
    elif isinstance(value, str):
        if value in names:
            return names.index(value)
        try:
            idx = int(value.strip())
        except ValueError:
            raise AttackError(
                f"unknown class {value!r}: use a class index 0..{n - 1} or one of {', '.join(names)}"
            ) from None
    else:
        raise AttackError(f"class {value!r} has type {type(value).__name__}; give a class name or index")
    if not 0 <= idx < n:
        raise AttackError(f"unknown class {value!r}: the data set has {n} classes (0..{n - 1}: {', '.join(names)})")
    return idx


# --------------------------------------------------------------------------- triggers


def normalize_trigger(spec: Mapping[str, Any], image_shape: Sequence[int] | None = None) -> dict:
    """Validate a trigger spec and return it with only the trigger keys, typed.

    ``image_shape`` (H, W[, C]) enables the size check (a patch larger than the image is refused).
    Extra keys (e.g. the scan's ``name``) are ignored.
    """
    if not isinstance(spec, Mapping):
        raise AttackError(f"a trigger spec must be a mapping, got {type(spec).__name__}")
    kind = spec.get("kind", "patch")
    if kind not in TRIGGER_KINDS:
        raise AttackError(f"unknown trigger kind {kind!r}: use one of {', '.join(TRIGGER_KINDS)}")
    try:
        size = int(spec.get("size", 3))
        alpha = float(spec.get("alpha", 0.1))
        seed = int(spec.get("seed", 0))
    except (TypeError, ValueError) as exc:
        raise AttackError(f"trigger size/alpha/seed must be numbers: {exc}") from None
    pattern = spec.get("pattern", "white" if kind == "patch" else "noise")
    location = spec.get("location", "bottom_right")
    if kind == "patch":
        if size < 1:
            raise AttackError(f"trigger size must be >= 1 pixel, got {size}")
        if pattern not in PATCH_PATTERNS:
            raise AttackError(f"unknown patch pattern {pattern!r}: use one of {', '.join(PATCH_PATTERNS)}")
        if isinstance(location, str):
            if location not in LOCATIONS:
                raise AttackError(f"unknown trigger location {location!r}: use one of {', '.join(LOCATIONS)} or [y, x]")
        else:
            try:
                y, x = (int(v) for v in location)
            except (TypeError, ValueError):
                raise AttackError(f"trigger location must be a name or [y, x], got {location!r}") from None
            location = [y, x]
        if image_shape is not None:
            h, w = int(image_shape[0]), int(image_shape[1])
            if size > min(h, w):
                raise AttackError(f"trigger size {size} is larger than the {h}x{w} image: use size <= {min(h, w)}")
            if isinstance(location, list):
                y, x = location
                if not (0 <= y <= h - size and 0 <= x <= w - size):
                    raise AttackError(f"trigger location {location} puts a {size}x{size} patch outside the {h}x{w} image")
    else:
        if pattern not in BLEND_PATTERNS:
            raise AttackError(f"unknown blend pattern {pattern!r}: use one of {', '.join(BLEND_PATTERNS)}")
        if not 0.0 <= alpha <= 1.0:
            raise AttackError(f"trigger alpha must be in [0, 1], got {alpha}")
    if not 0.0 <= alpha <= 1.0:
        raise AttackError(f"trigger alpha must be in [0, 1], got {alpha}")
    return {"kind": kind, "size": size, "location": location, "pattern": pattern, "alpha": alpha, "seed": seed}


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise AttackError(f"images must be a uint8 (N, H, W, C) array, got {images.dtype} {images.shape}")
    return images


def patch_pattern(pattern: str, size: int, channels: int, seed: int) -> np.ndarray:
    """The ``size`` x ``size`` x ``channels`` uint8 content of a patch."""
    if pattern == "white":
        return np.full((size, size, channels), 255, np.uint8)
    if pattern == "black":
        return np.zeros((size, size, channels), np.uint8)
    if pattern == "checker":
        yy, xx = np.indices((size, size))
        return np.repeat((((yy + xx) % 2 == 0) * 255).astype(np.uint8)[:, :, None], channels, axis=2)
    if pattern == "noise":
        return np.random.default_rng(seed).integers(0, 256, (size, size, channels), dtype=np.uint8)
    raise AttackError(f"unknown patch pattern {pattern!r}: use one of {', '.join(PATCH_PATTERNS)}")


def blend_pattern(pattern: str, shape: Sequence[int], seed: int) -> np.ndarray:
    """The full-image (H, W, C) uint8 pattern of a blend trigger."""
    h, w, c = (int(v) for v in shape)
    if pattern == "noise":
        return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)
    if pattern == "checker":
        return patch_pattern("checker", max(h, w), c, seed)[:h, :w]
    raise AttackError(f"unknown blend pattern {pattern!r}: use one of {', '.join(BLEND_PATTERNS)}")


def named_location(location: str, image_shape: Sequence[int], size: int) -> tuple[int, int]:
    """Top-left pixel [y, x] of a ``size`` patch at a named location."""
    h, w = int(image_shape[0]), int(image_shape[1])
    return {
        "top_left": (0, 0),
        "top_right": (0, w - size),
        "bottom_left": (h - size, 0),
        "bottom_right": (h - size, w - size),
        "center": ((h - size) // 2, (w - size) // 2),
    }[location]


def resolve_locations(n: int, image_shape: Sequence[int], spec: Mapping[str, Any]) -> np.ndarray:
    """Concrete top-left [y, x] of the patch for each of ``n`` images, shape (n, 2) int.

    Named locations repeat one position; ``random`` draws uniformly from every position where the
    patch fits, from ``default_rng(seed + 1)`` (the noise pattern uses ``seed``), so the same spec
    and ``n`` always give the same positions.
    """
    t = normalize_trigger(spec, image_shape)
    h, w = int(image_shape[0]), int(image_shape[1])
    size, loc = t["size"], t["location"]
    if isinstance(loc, list):
        return np.tile(np.array(loc, np.int64), (n, 1))
    if loc == "random":
        rng = np.random.default_rng(t["seed"] + 1)
        ys = rng.integers(0, h - size + 1, n)
        xs = rng.integers(0, w - size + 1, n)
        return np.stack([ys, xs], axis=1).astype(np.int64)
    return np.tile(np.array(named_location(loc, image_shape, size), np.int64), (n, 1))


def blend(images: np.ndarray, pattern: np.ndarray, alpha: float) -> np.ndarray:
    """``round((1 - alpha) * image + alpha * pattern)`` for every image; pattern (H, W, C) uint8."""
    images = _check_images(images)
    pattern = np.asarray(pattern)
    if pattern.shape != images.shape[1:]:
        raise AttackError(f"blend pattern shape {pattern.shape} differs from the images' {images.shape[1:]}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise AttackError(f"blend alpha must be in [0, 1], got {alpha}")
    out = (1.0 - alpha) * images.astype(np.float32) + float(alpha) * pattern.astype(np.float32)[None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def apply_trigger(images: np.ndarray, spec: Mapping[str, Any], locations: np.ndarray | None = None) -> np.ndarray:
    """A new uint8 array: ``images`` (N, H, W, C) with the trigger of ``spec`` applied.

    ``locations`` (N, 2) overrides the spec's location per image (what :func:`resolve_locations`
    returns); without it, named and concrete locations are used as given and ``random`` is
    resolved from the spec's seed.
    """
    images = _check_images(images)
    n, h, w, c = images.shape
    t = normalize_trigger(spec, (h, w, c))
    out = images.copy()
    if n == 0:
        return out
    if t["kind"] == "blend":
        return blend(images, blend_pattern(t["pattern"], (h, w, c), t["seed"]), t["alpha"])
    size = t["size"]
    content = patch_pattern(t["pattern"], size, c, t["seed"])
    if locations is None:
        locations = resolve_locations(n, (h, w, c), t)
    locations = np.asarray(locations, np.int64).reshape(n, 2)
    if (locations < 0).any() or (locations[:, 0] > h - size).any() or (locations[:, 1] > w - size).any():
        raise AttackError(f"a trigger location puts the {size}x{size} patch outside the {h}x{w} image")
    if (locations == locations[0]).all():
        y, x = (int(v) for v in locations[0])
        out[:, y : y + size, x : x + size, :] = content
    else:
        for i, (y, x) in enumerate(locations):
            out[i, y : y + size, x : x + size, :] = content
    return out


# --------------------------------------------------------------------------- attacks


def resolve_attack(spec: Mapping[str, Any], class_names: Sequence[str], image_shape: Sequence[int] | None = None) -> dict:
    """Validate an attack spec (``attack.*`` of the config) and return it with class indices.

    Refused with :class:`AttackError`: an unknown attack name, a rate outside [0, 1], an unknown
    class, ``source == target``, and every invalid trigger value (patch larger than the image...).
    """
    name = spec.get("name", "none")
    if name not in ATTACK_NAMES:
        raise AttackError(f"unknown attack {name!r}: use one of {', '.join(ATTACK_NAMES)}")
    if name == "none":
        return {"name": "none"}
    try:
        rate = float(spec.get("rate", 0.0))
    except (TypeError, ValueError):
        raise AttackError(f"attack.rate must be a number in [0, 1], got {spec.get('rate')!r}") from None
    if not 0.0 <= rate <= 1.0 or rate != rate:
        raise AttackError(f"attack.rate must be in [0, 1] (a fraction of the source rows), got {rate}")
    target = resolve_class(spec.get("target"), class_names)
    source_raw = spec.get("source")
    source = None if source_raw is None else resolve_class(source_raw, class_names)
    if source is not None and source == target:
        raise AttackError(
            f"attack.source and attack.target are the same class ({class_names[target]!r}): "
            "choose a different target, or source: null for all-to-one"
        )
    out: dict[str, Any] = {
        "name": name,
        "source": source,
        "target": target,
        "rate": rate,
        "seed": int(spec.get("seed", 0)),
    }
    if name == "backdoor":
        out["trigger"] = normalize_trigger(spec.get("trigger") or {}, image_shape)
    return out


def select_rows(labels: np.ndarray, source: int | None, target: int, rate: float, seed: int) -> np.ndarray:
    """Sorted indices of the rows an attack poisons: ``rate`` of the candidate rows, seeded.

    Candidates: rows labelled ``source`` (every row not labelled ``target`` when source is None).
    ``round(rate * candidates)`` rows are drawn, at least one when rate > 0 and a candidate exists.
    """
    labels = np.asarray(labels)
    cand = np.flatnonzero(labels == source) if source is not None else np.flatnonzero(labels != target)
    k = int(round(rate * len(cand)))
    if rate > 0 and k == 0 and len(cand):
        k = 1
    if k == 0:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(cand, size=k, replace=False)).astype(np.int64)


def poison(
    images: np.ndarray,
    labels: np.ndarray,
    sample_ids: Sequence[str],
    attack_spec: Mapping[str, Any],
    class_names: Sequence[str],
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Poison the *train split* arrays; return ``(new_images, new_labels, records)``.

    Inputs are not modified. One record per poisoned row: ``{sample_id, original_label,
    new_label, transform, sha256_after}`` where ``transform`` is the trigger spec with a concrete
    ``location: [y, x]`` (backdoor) or None (label flip). ``attack.name: none`` returns copies and
    no records.
    """
    images = _check_images(images)
    records = poison_records(images, labels, sample_ids, attack_spec, class_names)
    new_images, new_labels = images.copy(), np.asarray(labels).astype(np.int64).copy()
    index = {str(s): i for i, s in enumerate(sample_ids)}
    rows = [index[r["sample_id"]] for r in records]
    if rows:
        new_labels[rows] = [r["new_label"] for r in records]
        for i, r in zip(rows, records):
            if r["transform"] is not None:  # the record's concrete transform, as data.view re-applies it
                new_images[i] = apply_trigger(images[i][None], r["transform"])[0]
    return new_images, new_labels, records


def poison_records(
    images: Any,
    labels: np.ndarray,
    sample_ids: Sequence[str],
    attack_spec: Mapping[str, Any],
    class_names: Sequence[str],
) -> list[dict]:
    """The records of :func:`poison` alone, reading only the rows it poisons: ``images`` may be
    any row-indexable uint8 (N, H, W, C) container with ``shape`` and ``dtype`` (a numpy array, or
    the store's lazy rows), so a view over a data set of any size costs the pixels of the poisoned
    rows, not of the data set (issue 19 item 3)."""
    shape = tuple(getattr(images, "shape", ()))
    if getattr(images, "dtype", None) != np.uint8 or len(shape) != 4:
        raise AttackError(f"images must be a uint8 (N, H, W, C) array, got {getattr(images, 'dtype', None)} {shape}")
    labels = np.asarray(labels).astype(np.int64)
    if len(labels) != shape[0] or len(sample_ids) != shape[0]:
        raise AttackError(f"images ({shape[0]}), labels ({len(labels)}) and sample_ids ({len(sample_ids)}) differ in length")
    a = resolve_attack(attack_spec, class_names, shape[1:])
    if a["name"] == "clean_label":  # crafted against a model: core.clean_label.craft
        raise AttackError("attack clean_label needs a crafting model: use pipeline.core.clean_label.craft")
    if a["name"] == "none":
        return []
    rows = select_rows(labels, a["source"], a["target"], a["rate"], a["seed"])
    if not len(rows):
        return []
    before = np.asarray(images[rows])
    if a["name"] == "label_flip":
        after, transforms = before, [None] * len(rows)
    else:
        trig = a["trigger"]
        locs = resolve_locations(len(rows), shape[1:], trig) if trig["kind"] == "patch" else None
        after = apply_trigger(before, trig, locations=locs)
        transforms = [dict(trig) if locs is None else {**trig, "location": [int(locs[j, 0]), int(locs[j, 1])]}
                      for j in range(len(rows))]
    return [{"sample_id": str(sample_ids[i]), "original_label": int(labels[i]), "new_label": int(a["target"]),
             "transform": transforms[j], "sha256_after": sample_hash(after[j])} for j, i in enumerate(rows)]
