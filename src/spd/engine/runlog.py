"""The run folder while a run trains: its guard (one writer, no silent restart, resume only with a
matching config), metrics.jsonl + TensorBoard (rank 0), and the stop flag SIGTERM / SIGINT raise."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
from pathlib import Path

import yaml

from spd.errors import RunFolderError

# Settings a resumed run may change without breaking exactness of what was already trained.
RESUMABLE_CHANGES = {
    "max_steps", "epochs", "log_every", "ckpt_every", "keep_last", "max_nonfinite", "data.workers",
    "eval.every_steps", "eval.limit", "activation_checkpointing",  # recomputation: the same numbers
}


class Preemption:
    """SIGTERM (what schedulers send before pre-emption) or SIGINT (Ctrl-C) sets a flag; the loop
    finishes its step, saves checkpoints/last and stops (the CLI then exits with EXIT_PREEMPTED)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class RunFolderGuard:
    """Rank 0's hold on a run folder for the run's lifetime: an exclusive lock (a second process on
    the same folder fails at once), no silent restart over an existing run, and a resume only with a
    config that keeps the run exact (the safe changes are RESUMABLE_CHANGES)."""

    RUN_FILES = ("metrics.jsonl", "config.yaml", "first_step_grads.safetensors")  # beside checkpoints/ and tb/

    def __init__(self, run_dir: Path, config: dict, resume: bool, overwrite: bool) -> None:
        if resume and overwrite:
            raise RunFolderError("--resume continues a run and --overwrite deletes it: give one of them")
        if self._holds_run(run_dir) and not (resume or overwrite):  # refuse before touching the folder
            raise RunFolderError(f"{run_dir} already holds a run: pass --resume to continue it, or --overwrite "
                                 "to delete it and start afresh")
        if resume and self._foreign(run_dir):
            raise RunFolderError(f"--resume {run_dir}: not a run folder (no checkpoints/last, metrics.jsonl or "
                                 "config.yaml, but other files): give the run's folder, or an empty or new one")
        saved = self._saved_config(run_dir) if resume and self._holds_run(run_dir) else None  # readable, or refused now
        self._run_dir, self._created_dir = run_dir, not run_dir.exists()
        self._created_lock = not (run_dir / ".lock").exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / ".lock", "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "?"
            self._file.close()
            raise RunFolderError(f"{run_dir} is in use by another training process (pid {holder})") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()
        existing = self._holds_run(run_dir)
        if existing and not resume:  # --overwrite
            self.clear(run_dir)
        if existing and resume and saved is not None:
            self._check_resumable(saved, config, run_dir)

    @staticmethod
    def _holds_run(run_dir: Path) -> bool:
        return (run_dir / "checkpoints" / "last").exists() or (run_dir / "metrics.jsonl").exists()

    @staticmethod
    def _saved_config(run_dir: Path) -> dict | None:
        """The run's config.yaml (None when it has none); RunFolderError when it is not readable YAML."""
        path = run_dir / "config.yaml"
        if not path.is_file():
            return None
        try:
            saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            saved = err
        if not isinstance(saved, dict):
            raise RunFolderError(f"--resume: {path} is corrupted ({' '.join(str(saved).split())[:120]}): the run cannot "
                                 "be continued exactly; --overwrite starts it afresh")
        return saved

    @classmethod
    def _foreign(cls, run_dir: Path) -> bool:
        """A folder with files, none of them a run's: resuming "into" it would start a run among them."""
        if not run_dir.is_dir():
            return False
        names = {p.name for p in run_dir.iterdir()} - {".lock"}
        return bool(names) and not (names & {"checkpoints", "tb", *cls.RUN_FILES})

    @classmethod
    def clear(cls, run_dir: Path) -> None:
        """Deletes what a run writes (checkpoints, TensorBoard logs, metrics, config); keeps anything else."""
        for name in ("checkpoints", "tb"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in cls.RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)

    def _check_resumable(self, saved: dict, requested: dict, run_dir: Path) -> None:
        changed = [k for k in sorted(set(_flatten(saved)) | set(_flatten(requested)))
                   if _flatten(saved).get(k) != _flatten(requested).get(k) and k not in RESUMABLE_CHANGES]
        if changed:
            self.release()
            listed = ", ".join(f"{k}: {_flatten(saved).get(k)!r} -> {_flatten(requested).get(k)!r}" for k in changed[:4])
            raise RunFolderError(f"--resume: the config differs from {run_dir / 'config.yaml'} in {listed}"
                                 f"{' ...' if len(changed) > 4 else ''}; resuming would not continue the same run "
                                 f"(only {', '.join(sorted(RESUMABLE_CHANGES))} may change)")

    def release(self, tidy: bool = False) -> None:
        """Unlocks the folder; `tidy` (a run that failed before any checkpoint) also removes the lock
        file and the folder when this guard created them and nothing else is left in it."""
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
        if tidy and self._created_lock:
            (self._run_dir / ".lock").unlink(missing_ok=True)
            if self._created_dir and not any(self._run_dir.iterdir()):
                self._run_dir.rmdir()


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "model":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drops the rows of metrics.jsonl after `step` (written by a run killed after its last
    checkpoint): after a resume every step appears once. Rewritten in place, so that the run's
    logger (which appends) keeps writing to the same file."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    with open(path, "r+") as f:
        kept = []
        for line in f.read().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill -9
        f.seek(0)
        f.write("".join(line + "\n" for line in kept))
        f.truncate()


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
