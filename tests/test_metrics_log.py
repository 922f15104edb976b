"""The console progress line of MetricsLog."""
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
