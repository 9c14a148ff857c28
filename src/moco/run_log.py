"""The run's record: ``metrics.jsonl`` (one JSON object per line) and TensorBoard."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

class MetricsLog:
    """Append-only ``metrics.jsonl`` (one JSON object per line) plus optional TensorBoard.

    On resume, ``keep_rows`` (the row count a checkpoint recorded) cuts the file back to what
    existed when that checkpoint was written, so rows of lost steps are not duplicated.
    """

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int | None, keep_rows: int | None = None) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.rows = 0
        if resume_step is not None and self.path.exists():
            rows = []
            for line in self.path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a kill
                    break
            if keep_rows is not None:
                kept = rows[:keep_rows]
            else:  # checkpoints from before the row count was recorded
                kept = [r for r in rows if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            self.rows = len(kept)
        else:
            self.path.write_text("")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = resume_step + 1 if resume_step is not None else None
                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
            except ImportError:
                self.writer = None

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        self.rows += 1
        if self.writer is not None:
            step = row.get("step", 0)
            for key, value in row.items():
                if key not in ("step", "epoch", "kind") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{row.get('kind', 'train')}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class NullLog:
    """What ranks other than 0 log: nothing (rank 0 writes the run's metrics)."""

    rows = 0

    def write(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
