"""MetricsLog: the console progress line, and TensorBoard events as TensorBoard itself reads them."""
import math
import os

import pytest
from tensorboard.backend.event_processing import event_accumulator

from jmp_jax.training.metrics_log import MetricsLog


def test_progress_shows_dashes_until_the_first_loss_and_rate(tmp_path, capsys):
    log = MetricsLog(str(tmp_path), total_steps=10, tensorboard=False)
    log.progress(1, None)
    first = capsys.readouterr().err
    assert "1/10 loss - - steps/s ETA --:--:--" in first and "nan" not in first
    log.progress(2, 0.25)
    second = capsys.readouterr().err
    assert "2/10 loss 0.2500 " in second and "steps/s ETA " in second and "--:--:--" not in second
    log.close()


def test_tensorboard_reads_the_logged_scalars_and_skips_non_finite_ones(tmp_path):
    log = MetricsLog(str(tmp_path), total_steps=10)
    log.write(1, {"loss": 0.5, "lr": 1e-4})
    log.write(2, {"loss": math.nan, "lr": 2e-4})
    log.close()
    logdir = os.path.join(tmp_path, "tensorboard")
    events = event_accumulator.EventAccumulator(logdir)
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "lr"]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5)]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("lr")] == [(1, 1e-4), (2, 2e-4)]
