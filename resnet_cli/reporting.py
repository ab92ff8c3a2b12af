"""What a run shows and writes: progress, per-epoch lines, metrics.jsonl, curves.png."""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .checkpoint import atomic_write_bytes

log = logging.getLogger("resnet_cli")

# Fields that depend on the machine's speed, not on the computation.
TIMING_FIELDS = ("epoch_time_s", "train_images_per_s", "eval_time_s", "wall_time_s", "elapsed_s")


def progress_mode(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bar" if sys.stdout.isatty() else "plain"


@contextmanager
def epoch_progress(mode: str, epoch: int, epochs: int, total_steps: int, start_step: int = 0
                   ) -> Iterator[Callable[[int, float, float, float], None]]:
    """Yields update(step, loss, acc, images_per_s). A rich bar on a terminal, else nothing
    (plain mode prints one line per epoch instead)."""
    if mode != "bar":
        yield lambda *a: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("train", total=total_steps, completed=start_step, stats="")

        def update(step: int, loss: float, acc: float, ips: float) -> None:
            bar.update(task, completed=step, stats=f"loss {loss:.4f} acc {acc:.4f} {ips:,.0f} img/s")

        yield update


def epoch_line(m: dict[str, Any], epochs: int) -> str:
    # The validation split (what best.pt is chosen by) and the EMA's scores, where the run has them.
    extra = "".join(f"  {k} {m[k]:.4f}" for k in ("val_acc", "ema_val_acc", "ema_test_acc") if k in m)
    return (f"epoch {m['epoch']}/{epochs}  train_loss {m['train_loss']:.4f}  train_acc {m['train_acc']:.4f}  "
            f"test_loss {m['test_loss']:.4f}  test_acc {m['test_acc']:.4f}{extra}  lr {m['lr']:.4g}  "
            f"{m['train_images_per_s']:,.0f} img/s  {m['epoch_time_s']:.1f}s")


class MetricsFile:
    """metrics.jsonl: one JSON object per finished epoch."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a crash
                    break
        return rows

    def keep_until(self, epoch: int) -> list[dict[str, Any]]:
        """On resume: drop rows of epochs after the checkpoint (written after it was saved)."""
        rows = [r for r in self.read() if r.get("epoch", 0) <= epoch]
        self.rewrite(rows)
        return rows

    def rewrite(self, rows: list[dict[str, Any]]) -> None:
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in rows).encode())

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def curves_title(rows: list[dict[str, Any]], title: str) -> str:
    """The figure's claim, as results.json makes it: the final epoch's test accuracy, and the
    epoch a validation split chose (never the best of the test epochs, which selects on test)."""
    claim = f"final test acc {rows[-1]['test_acc']:.4f}"
    scored = [r for r in rows if r.get("val_acc") is not None]
    if scored:
        best = max(scored, key=lambda r: r["val_acc"])  # the first epoch with the best, as best.pt
        claim += f"; best val acc {best['val_acc']:.4f} @ epoch {best['epoch']}"
    return f"{title}  ({claim})"


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """The reference's figure: train loss, train acc and test acc against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(epochs, [r["train_loss"] for r in rows], "-o", ms=3, label="train loss")
    ax.plot(epochs, [r["train_acc"] for r in rows], "--s", ms=3, label="train acc")
    ax.plot(epochs, [r["test_acc"] for r in rows], "-.^", ms=3, label="test acc")
    ax.set_xlabel("epoch")
    ax.set_xlim(0.5, max(epochs) + 0.5)
    ax.set_ylim(0, max(1.0, max(r["train_loss"] for r in rows) * 1.05))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(curves_title(rows, title), fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
