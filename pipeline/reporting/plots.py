"""Pictures of the attack, not only of clean accuracy: PNG bytes for MLflow, release.html and
DVC, and the row data for ``dvc plots``.

Axis convention, for EVERY confusion view in this project (PNG, dvc plots, HTML):
rows (vertical axis) = actual (true) class, columns (horizontal axis) = predicted class,
classes in index order, top-to-bottom and left-to-right. This is sklearn's
``confusion_matrix`` / ``ConfusionMatrixDisplay`` layout; ``dvc plots`` gets the same picture
only with ``x: predicted, y: actual`` (its confusion template puts ``x`` on the horizontal axis,
see :data:`DVC_CONFUSION_PLOT`).

Rendering uses matplotlib's object API on an Agg canvas (``Figure`` + ``FigureCanvasAgg``):
no pyplot figure registry, no display, no global backend switch, so it is safe inside any stage
and in parallel tests. Sizes are fixed by the inputs (no ``bbox_inches="tight"``), so a PNG's
pixel size is predictable (each function's docstring gives it).
"""

from __future__ import annotations

import io
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from pipeline.reporting import ReportingError, number, worst_asr

#: The ``plots:`` entry for the evaluate stage in dvc.yaml. DVC's ``confusion`` template draws
#: the ``x`` field on the horizontal axis and ``y`` on the vertical one (dvc_render
#: ConfusionTemplate: ``encoding.x.field = <x>``); ``x: actual, y: predicted`` therefore put the
#: actual class on the columns: the transpose of confusion.png.
DVC_CONFUSION_PLOT = {
    "template": "confusion",
    "x": "predicted",
    "y": "actual",
    "x_label": "predicted class",
    "y_label": "actual class",
}


def _canvas(width_in: float, height_in: float, dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return buf.getvalue()


# --------------------------------------------------------------------------- ASR heatmap


def asr_matrix(metrics: Optional[Mapping[str, Any]], triggers: Optional[Sequence[str]] = None,
               targets: Optional[Sequence[str]] = None) -> tuple[list[str], list[str], np.ndarray]:
    """``(triggers, targets, values)``: ``values[i, j]`` = ASR of trigger i into target j, NaN
    where undefined (no eligible image, the source->source pair of a source-specific attack, or
    absent from ``metrics``). Row/column order: the given lists, else the metrics' own order."""
    asr = (metrics or {}).get("asr") or {}
    if not isinstance(asr, Mapping):
        raise ReportingError("metrics['asr'] must be {trigger: {target: value}} as in reports/metrics.json")
    trig = [str(t) for t in (triggers if triggers is not None else asr)]
    if targets is None:
        seen: dict[str, None] = {}
        for t in asr.values():
            for c in (t or {}):
                seen.setdefault(str(c), None)
        targets = list(seen)
    tgt = [str(c) for c in targets]
    values = np.full((len(trig), len(tgt)), np.nan)
    for i, t in enumerate(trig):
        row = asr.get(t) or {}
        for j, c in enumerate(tgt):
            v = number(row.get(c)) if isinstance(row, Mapping) else None
            if v is not None:
                values[i, j] = v
    return trig, tgt, values


def asr_heatmap_size(n_triggers: int, n_targets: int) -> tuple[float, float]:
    """Figure size in inches of :func:`asr_heatmap_png` (pixels = inches x dpi)."""
    panel = 0.55 * max(1, n_targets) + 0.3
    return round(2 * panel + 2.6, 2), round(0.45 * max(1, n_triggers) + 1.7, 2)


def asr_heatmap_png(candidate_metrics: Mapping[str, Any], baseline_metrics: Optional[Mapping[str, Any]],
                    *, max_asr: Optional[float] = None, dpi: int = 100) -> bytes:
    """Scan trigger x target class ASR, candidate (left) beside baseline (right).

    One colour scale, 0..1, shared by both panels and a single colour bar, so equal colours mean
    equal rates. Every defined cell is annotated with its value; undefined cells are hatched grey
    and read ``n/a`` (an undefined rate is not a zero: the gate fails closed on it). With
    ``max_asr`` (the gate threshold) cells above it get a thick outline. Rows and columns are the
    candidate's triggers and targets (the baseline's extra ones appended) in both panels.
    Size: :func:`asr_heatmap_size` inches x ``dpi``.
    """
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    trig, tgt, cand = asr_matrix(candidate_metrics)
    if baseline_metrics is not None:
        btrig, btgt, _ = asr_matrix(baseline_metrics)
        trig += [t for t in btrig if t not in trig]
        tgt += [c for c in btgt if c not in tgt]
        trig, tgt, cand = asr_matrix(candidate_metrics, trig, tgt)
        _, _, base = asr_matrix(baseline_metrics, trig, tgt)
    else:
        base = None
    if not trig or not tgt:
        raise ReportingError("the candidate metrics have no ASR table: nothing to draw (run the evaluate stage)")
    w, h = asr_heatmap_size(len(trig), len(tgt))
    fig = _canvas(w, h, dpi)
    # two panels and a thin colour-bar column; margins in inches so long trigger names fit
    gs = fig.add_gridspec(1, 3, width_ratios=[len(tgt), len(tgt), 0.25], left=1.4 / w, right=1 - 0.7 / w,
                          bottom=0.85 / h, top=1 - 0.75 / h, wspace=0.06)
    axes = [fig.add_subplot(gs[0])]
    axes.append(fig.add_subplot(gs[1], sharey=axes[0]))
    cax = fig.add_subplot(gs[2])
    norm = Normalize(0.0, 1.0)
    cmap = "Reds"
    im = None
    for ax, values, who, metrics in ((axes[0], cand, "candidate", candidate_metrics),
                                     (axes[1], base, "baseline", baseline_metrics)):
        ax.set_xticks(range(len(tgt)), tgt, rotation=45, ha="right")
        ax.set_yticks(range(len(trig)), trig)
        ax.tick_params(axis="y", labelleft=ax is axes[0])
        ax.set_xlabel("target class")
        if values is None:
            ax.set_title(f"{who}: not available")
            ax.set_xlim(-0.5, len(tgt) - 0.5)
            ax.set_ylim(len(trig) - 0.5, -0.5)
            continue
        masked = np.ma.masked_invalid(values)
        im = ax.imshow(masked, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        for i in range(len(trig)):
            for j in range(len(tgt)):
                v = values[i, j]
                if np.isnan(v):
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="#dddddd", edgecolor="#999999",
                                           hatch="///", linewidth=0))
                    ax.text(j, i, "n/a", ha="center", va="center", fontsize=7, color="#555555")
                    continue
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v > 0.6 else "black")
                if max_asr is not None and v > max_asr:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2))
        worst = worst_asr(metrics)
        label = "" if worst is None else f" (max {worst[2]:.2f}: {worst[0]} -> {worst[1]})"
        kind = ((metrics or {}).get("baseline") or {}).get("kind") if who == "baseline" else None
        ax.set_title(f"{who}{' ' + kind if kind else ''}{label}", fontsize=9)
    axes[0].set_ylabel("scan trigger")
    if im is not None:
        fig.colorbar(im, cax=cax, label="ASR (0..1)")
    else:
        cax.set_axis_off()
    fig.suptitle("ASR: fraction of correctly classified non-target images sent to the target by the trigger",
                 fontsize=9)
    return _png(fig)


# --------------------------------------------------------------------------- confusion


def confusion_size(n_classes: int) -> tuple[float, float]:
    """Figure size in inches of :func:`confusion_png`."""
    side = max(4.0, 0.45 * n_classes + 2.0)
    return side, round(side * 0.9, 2)


def confusion_png(confusion: Any, class_names: Sequence[str], title: str, *, dpi: int = 100) -> bytes:
    """A confusion matrix drawn by ``sklearn.metrics.ConfusionMatrixDisplay``.

    Axis convention (the project's one for every confusion view): rows = actual (true) class,
    columns = predicted class, both in class-index order; a perfect model is a diagonal from top
    left to bottom right. Counts are annotated up to 20 classes. Size: :func:`confusion_size`
    inches x ``dpi``.
    """
    from sklearn.metrics import ConfusionMatrixDisplay

    cm = np.asarray(confusion)
    k = len(class_names)
    if cm.ndim != 2 or cm.shape != (k, k):
        raise ReportingError(f"confusion has shape {cm.shape} but there are {k} class names: pass a "
                             f"{k}x{k} matrix (rows = actual, columns = predicted)")
    w, h = confusion_size(k)
    fig = _canvas(w, h, dpi)
    ax = fig.subplots()
    disp = ConfusionMatrixDisplay(confusion_matrix=cm, display_labels=[str(c) for c in class_names])
    fmt = "d" if np.issubdtype(cm.dtype, np.integer) else ".2f"
    disp.plot(ax=ax, cmap="Blues", include_values=k <= 20, values_format=fmt, xticks_rotation=45, colorbar=True)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("actual class")
    ax.set_title(title, fontsize=10)
    fig.subplots_adjust(left=0.16, right=0.95, bottom=0.2, top=0.9)
    return _png(fig)


def triggered_confusion(labels: Any, triggered_predictions: Any, num_classes: int,
                        mask: Any = None) -> np.ndarray:
    """Confusion matrix (rows = actual class, columns = predicted) of the predictions on triggered
    inputs: with a working backdoor one column (the target) fills up.

    ``labels``: true classes of the test images; ``triggered_predictions``: the model's classes
    for the same images with the trigger applied (evaluate: :func:`pipeline.reporting.worst_asr`
    picks the trigger). ``mask``: optional boolean selection, e.g. the ASR-eligible images.
    """
    from sklearn.metrics import confusion_matrix

    y = np.asarray(labels).astype(np.int64).ravel()
    p = np.asarray(triggered_predictions).astype(np.int64).ravel()
    if y.shape != p.shape:
        raise ReportingError(f"labels ({y.shape[0]}) and triggered predictions ({p.shape[0]}) differ in length")
    if mask is not None:
        m = np.asarray(mask, bool).ravel()
        if m.shape != y.shape:
            raise ReportingError(f"mask has {m.shape[0]} entries for {y.shape[0]} labels")
        y, p = y[m], p[m]
    if num_classes < 1 or (len(y) and (min(y.min(), p.min()) < 0 or max(y.max(), p.max()) >= num_classes)):
        raise ReportingError(f"class indices must lie in 0..{num_classes - 1}")
    return confusion_matrix(y, p, labels=list(range(num_classes))).astype(np.int64)


def confusion_rows(labels: Any, predictions: Any, class_names: Sequence[str]) -> list[dict[str, str]]:
    """One ``{"actual": name, "predicted": name}`` row per image, for ``dvc plots`` (a JSON list
    or the CSV the evaluate stage writes). Plot it with :data:`DVC_CONFUSION_PLOT`
    (``x: predicted, y: actual``) so it matches confusion.png."""
    y = np.asarray(labels).astype(np.int64).ravel()
    p = np.asarray(predictions).astype(np.int64).ravel()
    if y.shape != p.shape:
        raise ReportingError(f"labels ({y.shape[0]}) and predictions ({p.shape[0]}) differ in length")
    names = [str(c) for c in class_names]
    return [{"actual": names[a], "predicted": names[b]} for a, b in zip(y.tolist(), p.tolist())]


# --------------------------------------------------------------------------- samples


def select_samples(labels: Any, clean_pred: Any, trig_pred: Any, k: int) -> np.ndarray:
    """Indices of the samples to show: first the images the trigger flips (clean prediction right,
    triggered prediction wrong), then the rest, each group in index order (deterministic)."""
    y, c, t = (np.asarray(a).astype(np.int64).ravel() for a in (labels, clean_pred, trig_pred))
    flipped = np.flatnonzero((c == y) & (t != y))
    rest = np.flatnonzero(~((c == y) & (t != y)))
    return np.concatenate([flipped, rest])[:k]


def samples_size(k: int) -> tuple[float, float]:
    """Figure size in inches of :func:`triggered_samples_png` for ``k`` samples."""
    return round(1.3 * max(1, k) + 0.4, 2), 3.4


def triggered_samples_png(images: Any, triggered_images: Any, labels: Any, clean_pred: Any, trig_pred: Any,
                          class_names: Sequence[str], k: int = 8, *, title: Optional[str] = None,
                          dpi: int = 100) -> bytes:
    """``k`` test images, clean (top row) over triggered (bottom row), with the true class and the
    model's prediction on each; a triggered prediction that differs from the truth is red.

    ``images``/``triggered_images``: uint8 (N, H, W, C) with C = 1 or 3 (the arrays the stages
    hold). Samples: :func:`select_samples` (the trigger's successes first). Size:
    :func:`samples_size` (k clipped to N) inches x ``dpi``.
    """
    x = np.asarray(images)
    xt = np.asarray(triggered_images)
    if x.ndim != 4 or x.shape != xt.shape or x.shape[-1] not in (1, 3):
        raise ReportingError(f"images must be two uint8 arrays (N, H, W, 1|3) of one shape, got {x.shape} and {xt.shape}")
    n = x.shape[0]
    for name, arr in (("labels", labels), ("clean_pred", clean_pred), ("trig_pred", trig_pred)):
        if np.asarray(arr).ravel().shape[0] != n:
            raise ReportingError(f"{name} has {np.asarray(arr).ravel().shape[0]} entries for {n} images")
    if k < 1:
        raise ReportingError("k must be at least 1")
    idx = select_samples(labels, clean_pred, trig_pred, min(k, n))
    kk = max(1, len(idx))
    names = [str(c) for c in class_names]
    y, c, t = (np.asarray(a).astype(np.int64).ravel() for a in (labels, clean_pred, trig_pred))
    w, h = samples_size(kk)
    fig = _canvas(w, h, dpi)
    axes = np.asarray(fig.subplots(2, kk, squeeze=False))
    for col in range(kk):
        for row, arr, pred in ((0, x, c), (1, xt, t)):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(idx):
                ax.set_axis_off()
                continue
            i = int(idx[col])
            img = arr[i]
            if img.shape[-1] == 1:
                ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            else:
                ax.imshow(img.astype(np.uint8), interpolation="nearest")
            wrong = pred[i] != y[i]
            head = f"true {names[y[i]]}\n" if row == 0 else ""
            ax.set_title(f"{head}pred {names[pred[i]]}", fontsize=8, color="#b42318" if wrong else "black")
    axes[0, 0].set_ylabel("clean", fontsize=9)
    axes[1, 0].set_ylabel("triggered", fontsize=9)
    fig.suptitle(title or "clean (top) vs triggered (bottom); red = prediction differs from the true class",
                 fontsize=9)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.03, top=0.72, wspace=0.15, hspace=0.55)
    return _png(fig)
