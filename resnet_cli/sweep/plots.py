"""The sweep's figures: accuracy against learning rate, and training error per epoch.

Both are drawn from the rows of `folder.collect` and written atomically; matplotlib is
imported only when a figure is drawn.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_bytes
from .table import best_job


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _group_label(row: dict[str, Any], swept: list[str], skip: tuple[str, ...]) -> str:
    other = [f"{k}={row['_swept'][k]}" for k in swept if k not in skip]
    return " ".join([str(row.get("model"))] + other)


def _lr(row: dict[str, Any]) -> float | None:
    v = row["_swept"].get("lr", row.get("_lr"))
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if v > 0 and math.isfinite(v) else None


def plot_summary(path: Path, rows: list[dict[str, Any]], swept: list[str], title: str) -> None:
    """Best test accuracy against lr (log x), one line per model; per-job bars if lr is fixed."""
    plt = _pyplot()
    done = [r for r in rows if r["status"] == "ok" and r.get("best_test_acc") is not None]
    failed = [r for r in rows if r["status"] != "ok"]
    best = best_job(rows)
    lrs = {_lr(r) for r in rows} - {None}
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    if len(lrs) > 1:
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if _lr(r) is not None:
                groups.setdefault(_group_label(r, swept, ("lr", "model")), []).append(r)
        ok_lrs = [_lr(r) for r in done if _lr(r) is not None] or sorted(lrs)
        lo, hi = min(ok_lrs), max(ok_lrs)
        span = max(hi / lo, 10.0)
        edge_lo, edge_hi = lo / span ** 0.3, hi * span ** 0.3  # failed lrs far outside: drawn at the edge

        def x_of(r: dict[str, Any]) -> float:
            return min(max(_lr(r), edge_lo), edge_hi)

        for i, (label, members) in enumerate(sorted(groups.items())):
            color = f"C{i % 10}"
            ok = sorted((r for r in members if r in done), key=_lr)
            if ok:
                ax.plot([_lr(r) for r in ok], [r["best_test_acc"] for r in ok], "-o", ms=4, color=color, label=label)
            bad = [r for r in members if r in failed]
            if bad:
                ax.plot([x_of(r) for r in bad], [0.0] * len(bad), "x", ms=8, mew=2, color=color,
                        label=f"{label} (failed)")
                for r in bad:
                    if x_of(r) != _lr(r):
                        ax.annotate(f"lr={_lr(r):g}", (x_of(r), 0.0), textcoords="offset points", xytext=(0, 8),
                                    ha="center", fontsize=7, color=color)
        if best is not None and _lr(best) is not None:
            ax.plot([_lr(best)], [best["best_test_acc"]], "*", ms=14, color="gold", mec="black", zorder=5,
                    label=f"best: job {best['job']}")
        ax.set_xscale("log")
        shown = [x_of(r) for r in rows if _lr(r) is not None]
        ax.set_xlim(min(shown) / 1.4, max(shown) * 1.4)
        if len(set(ok_lrs)) <= 8:  # a grid: ticks at the swept values, written plainly
            from matplotlib.ticker import NullFormatter

            ax.set_xticks(sorted(set(ok_lrs)), [f"{v:g}" for v in sorted(set(ok_lrs))])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("learning rate")
        ax.set_ylim(-0.03, 1.0)
    else:  # lr was not swept: one bar per job
        ordered = sorted(rows, key=lambda r: r["job"])
        labels = [f"#{r['job']} {r['overrides']}"[:40] for r in ordered]
        values = [r.get("best_test_acc") or 0.0 if r["status"] == "ok" else 0.0 for r in ordered]
        colors = ["gold" if best is not None and r is best else ("C3" if r["status"] != "ok" else "C0")
                  for r in ordered]
        ax.barh(range(len(ordered)), values, color=colors)
        ax.set_yticks(range(len(ordered)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.0)
        for i, r in enumerate(ordered):
            if r["status"] != "ok":
                ax.text(0.01, i, "failed", va="center", fontsize=7, color="C3")
        ax.set_xlabel("best test accuracy (lr not swept)")
    if len(lrs) > 1:
        ax.set_ylabel("best test accuracy")
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_training_error(path: Path, rows: list[dict[str, Any]], swept: list[str], title: str) -> None:
    """Train (left) and test (right) error per epoch, one curve per model (its best job), plain
    nets dashed and residual nets solid: the shape of He et al. 2016, Fig. 1 and 6."""
    plt = _pyplot()
    per_model: dict[str, dict[str, Any]] = {}
    for r in rows:
        if not r["_metrics"]:
            continue
        key = str(r.get("model"))
        score = (r["status"] == "ok", r.get("best_test_acc") or 0.0)
        if key not in per_model or score > per_model[key]["_score"]:
            per_model[key] = {**r, "_score": score}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=120, sharey=True)
    for i, (name, r) in enumerate(sorted(per_model.items(), key=lambda kv: (kv[1]["_residual"], kv[0]))):
        epochs = [m["epoch"] for m in r["_metrics"]]
        style = "-" if r["_residual"] else "--"
        label = _group_label(r, [k for k in swept if k != "model"], ("lr",) if "lr" not in swept else ())
        if r["status"] != "ok":
            label += " (failed)"
        for ax, field in zip(axes, ("train_acc", "test_acc")):
            ax.plot(epochs, [100 * (1 - m[field]) for m in r["_metrics"]], style, marker="o", ms=2,
                    color=f"C{i % 10}", label=label)
    from matplotlib.ticker import MaxNLocator

    for ax, name in zip(axes, ("training error (%)", "test error (%)")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}\ndashed: plain nets, solid: residual nets", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
