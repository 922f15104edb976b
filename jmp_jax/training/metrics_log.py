"""Metric output: `<workdir>/metrics.jsonl`, TensorBoard event files, and a console progress line with ETA."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping


def keep_rows_up_to(path: str, last_step: int | None) -> None:
    """Drops the rows of `path` after `last_step` (all rows when None): the steps a resumed run writes again.

    The file is replaced whole, so a crash leaves either the old or the new rows.
    """
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [] if last_step is None else [
        line for line in lines if line.strip() and _row_step(line) is not None and _row_step(line) <= last_step]
    if len(kept) == len(lines):
        return
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def _row_step(line: str) -> int | None:
    """The step of a metrics row; None for a row cut short by a crash."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class MetricsLog:
    """resume_step: the step the run resumed from; rows after it are dropped (None: a fresh run, all are).

    files False (every process of a multi-process run but the first): the console line only.
    """

    def __init__(self, workdir: str, total_steps: int, *, resume_step: int | None = None, tensorboard: bool = True,
                 files: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        if files:
            keep_rows_up_to(self.path, resume_step)
        self._file = open(self.path, "a") if files else None
        self.total_steps = total_steps
        self._start = time.time()
        self._start_step: int | None = None
        self._tb = None
        if tensorboard and files:
            try:  # TensorBoard events need TensorFlow; the jsonl file is written regardless
                import tensorflow as tf
                self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
            except ImportError:
                print("metrics: TensorFlow is not installed, TensorBoard events are not written", file=sys.stderr)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._file is None:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        self._file.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._file.flush()
        if self._tb is not None:
            import tensorflow as tf
            with self._tb.as_default(step=int(step)):
                for k, v in clean.items():
                    if math.isfinite(v):
                        tf.summary.scalar(k, v)
            self._tb.flush()

    def progress(self, step: int, loss: float | None) -> None:
        """Redraws the console line; `loss` is None until the first logged window (shown as a dash)."""
        if self._start_step is None:
            self._start_step, self._start = step, time.time()
            rate = eta = None
        else:
            rate = (step - self._start_step) / max(time.time() - self._start, 1e-9)
            eta = (self.total_steps - step) / rate if rate > 0 else None
        width = 30
        filled = int(width * step / max(self.total_steps, 1))
        eta_text = "--:--:--" if eta is None else time.strftime("%H:%M:%S", time.gmtime(eta))
        loss_text = "-" if loss is None else f"{loss:.4f}"
        rate_text = "-" if rate is None else f"{rate:.2f}"
        print(f"\r[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total_steps} loss {loss_text} "
              f"{rate_text} steps/s ETA {eta_text}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr)
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
