"""Metric output: `<workdir>/metrics.jsonl`, TensorBoard event files, and a console progress line with ETA."""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from typing import Mapping

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter


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


class EventFile:
    """One TensorBoard event file of scalars, written with the tensorboard package's protos and record framing.

    Not tf.summary: that would import TensorFlow into every training process (seconds and ~0.8 GB of host
    memory, for a few scalars per logged step).
    """

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._writer = RecordWriter(open(self.path, "wb"))
        self._add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _add(self, event) -> None:
        self._writer.write(event.SerializeToString())
        self._writer.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
        self._add(event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values)))

    def close(self) -> None:
        self._writer.close()


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
            self._tb = EventFile(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._file is None:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        self._file.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._file.flush()
        if self._tb is not None:
            self._tb.write_scalars(int(step), {k: v for k, v in clean.items() if math.isfinite(v)})

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
