"""What a run leaves for people: metrics.jsonl, summary.json, the results table and loss.png."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from .atomic import write_atomic


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``; flushed per line so a kill loses nothing."""

    def __init__(self, path: Path, *, resume_step: int | None):
        self.path = path
        if resume_step is None:
            path.write_text("")
        else:
            self.truncate_after(resume_step)
        self._file = path.open("a")

    def truncate_after(self, step: int) -> None:
        """Drops records a killed run logged after its last checkpoint, so a resumed log reads as an
        uninterrupted one."""
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill ends the usable log
    return records


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def results_table(summaries: Iterable[dict]) -> str:
    """The origin's results table: mode, output folder, eval loss per epoch, peak memory."""
    rows = [("mode", "optimizer", "output", "eval loss per epoch", "peak memory")]
    for s in summaries:
        losses = " -> ".join(f"{x:.3f}" for x in s["eval_loss_per_epoch"]) or "-"
        rows.append((s["mode"], s["optimizer"], s["output_dir"], losses, _format_bytes(s["peak_memory_bytes"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_losses(metrics: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in metrics if r.get("type") == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in metrics if r.get("type") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _format_bytes(n: float | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
