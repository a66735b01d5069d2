"""What a run leaves behind while it trains: metrics.jsonl + TensorBoard (rank 0), and the
pre-emption flag that SIGTERM raises."""

from __future__ import annotations

import json
import signal
from pathlib import Path


class Preemption:
    """SIGTERM (what schedulers send before pre-emption) sets a flag; the loop saves and exits."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


class RunLogger:
    """Rank 0 only: metrics.jsonl (one JSON object per line) and TensorBoard scalars."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"))
        except ImportError:
            print("tensorboard is not installed: curves go to metrics.jsonl only (pip install tensorboard)")

    def log(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()
