"""The training loop's wait/step accounting (tvts_jax/input_meter.py and its use in train.py)."""
import time

from absl import logging
import numpy as np
import pytest

from tvts_jax import input_meter


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def _slow_iterator(clock, wait_s):
  while True:
    clock.now += wait_s  # the pipeline takes wait_s to deliver each batch
    yield {"x": 0}


def _run(meter, clock, iterator, steps, step_s):
  for _ in range(steps):
    meter.next(iterator)
    clock.now += step_s  # the step


def test_known_wait_gives_known_fraction_and_rates():
  clock = FakeClock()
  meter = input_meter.InputMeter(global_batch=64, per_host_batch=32, clock=clock)
  it = _slow_iterator(clock, 0.03)
  _run(meter, clock, it, steps=10, step_s=0.07)
  with meter.excluded():
    clock.now += 5.0  # an evaluation: neither waiting nor the step
  out = meter.interval()
  assert out["data_wait_fraction"] == pytest.approx(0.3)
  assert out["data_wait_s"] == pytest.approx(0.3)
  assert out["interval_s"] == pytest.approx(1.0)
  assert out["input_clips_per_s"] == pytest.approx(10 * 32 / 1.0)  # this host's pipeline
  assert out["step_clips_per_s"] == pytest.approx(10 * 64 / 0.7)
  assert out["clips_per_s"] == pytest.approx(640) and out["steps_per_s"] == pytest.approx(10)
  # The next interval starts afresh: no wait at all.
  _run(meter, clock, iter(dict, None), steps=4, step_s=0.5)
  out = meter.interval()
  assert out["data_wait_fraction"] == 0.0
  assert out["step_clips_per_s"] == pytest.approx(out["clips_per_s"]) == pytest.approx(128)


def test_warns_once_after_the_first_interval(monkeypatch):
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))
  clock = FakeClock()
  meter = input_meter.InputMeter(8, 8, clock=clock)
  it = _slow_iterator(clock, 0.2)
  for _ in range(3):  # 20% waiting in every interval
    _run(meter, clock, it, steps=5, step_s=0.8)
    meter.interval()
  assert len(warnings) == 1, warnings  # not for the first interval (compiling), then once
  assert "20%" in warnings[0] and "data.samples_per_visit" in warnings[0]
  assert "--jpeg_quality" in warnings[0] and "--short_side" in warnings[0]
  quiet = input_meter.InputMeter(8, 8, clock=clock)
  for _ in range(3):  # 5%: below the threshold
    _run(quiet, clock, _slow_iterator(clock, 0.05), steps=5, step_s=0.95)
    assert quiet.interval()["data_wait_fraction"] == pytest.approx(0.05)
  assert len(warnings) == 1


def test_worst_host_of_several():
  clock = FakeClock()
  # This host waits 10% of the interval; the gather returns host 2 waiting 60% of its 1.0 s.
  gathered = np.array([[0.1, 1.0], [0.2, 1.0], [0.6, 1.0], [0.0, 1.0]])
  seen = []

  def gather(x):
    seen.append(x)
    return gathered

  meter = input_meter.InputMeter(64, 16, process_count=4, clock=clock, gather=gather)
  _run(meter, clock, _slow_iterator(clock, 0.01), steps=10, step_s=0.09)
  out = meter.interval()
  np.testing.assert_allclose(seen[0], [0.1, 1.0])  # this host's (wait, interval)
  assert out["data_wait_fraction"] == pytest.approx(0.1)
  assert out["data_wait_fraction_worst"] == pytest.approx(0.6)
  assert out["data_wait_worst_host"] == 2
  assert out["step_clips_per_s"] == pytest.approx(10 * 64 / 0.4)  # the worst host's wait


def test_real_sleep_is_counted_as_waiting():
  # Real time: a sleep lasts at least its length, so these bounds always hold.
  meter = input_meter.InputMeter(4, 4)

  def slow():
    while True:
      time.sleep(0.02)
      yield {}

  it = slow()
  for _ in range(5):
    meter.next(it)
  out = meter.interval()
  assert out["data_wait_s"] >= 5 * 0.02
  assert 0.0 < out["data_wait_fraction"] <= 1.0
  assert out["step_clips_per_s"] >= out["clips_per_s"]

