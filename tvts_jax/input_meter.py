"""Where the training loop's time goes: waiting for the next batch, or running the step.

`InputMeter` times every `next(train_iter)` of the loop (the wait) and, per logged interval,
the interval's wall time without the evaluations and checkpoint saves in it (`excluded()`).
Everything else in the interval is the step: dispatching it, copying the batch to the devices,
and the blocking fetch of the metrics at log time, which drains the device's queue. So

    data_wait_fraction = wait / interval
    input_clips_per_s  = this host's clips / interval       (what its pipeline delivered)
    step_clips_per_s   = global clips / (interval - wait)   (what the step could take)

`input_clips_per_s` is the pipeline's full rate when the fraction is near 1 and a lower bound of
it otherwise (a pipeline that keeps up is held back by its prefetch buffer). The training loop
keeps at most one step queued on the device ahead of the one it dispatches (`train.py` blocks
on the metrics of the step before last), so the loop cannot run ahead of the device and count
the device's work as waiting; while it waits, the device has at most one queued step to run.

In a multi-host run the hosts exchange their (wait, interval) once per logged interval
(`process_allgather`): `data_wait_fraction` is this host's, `data_wait_fraction_worst` the
largest of all hosts' and `data_wait_worst_host` its index; `step_clips_per_s` then uses the
worst host's wait (the other hosts wait for it inside the step's collectives).

When the (worst) fraction exceeds `warn_fraction` (10%) in an interval after the first (the
first includes compiling the step and filling the pipeline), it logs one warning naming the
knobs that feed the step faster.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import numpy as np
from absl import logging

WARN_FRACTION = 0.10

KNOBS = ("records prepared with fewer bytes per frame (prepare --short_side=data.resize_short, "
         "a lower --jpeg_quality: the levers that measured fastest), more CPU cores per "
         "accelerator (`python -m tvts_jax.perf --input` says how many), "
         "data.{threads,parallel_calls,prefetch_batches} (the pipeline's parallelism), or "
         "data.samples_per_visit=2 (two examples from each record read: ~1.2x the clips "
         "per core, at the price of half as many videos a batch)")


def _allgather(x: np.ndarray) -> np.ndarray:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x))


class InputMeter:
  """Times the waits for batches against the interval; see the module docstring.

  Args:
    global_batch: clips per step over all hosts.
    per_host_batch: clips per step of this host's pipeline.
    process_count: hosts (> 1: the hosts exchange their figures at every `interval()`, which
      every host must call at the same steps).
    clock: seconds, monotonic (injectable for tests).
    warn_fraction: warn once when the wait exceeds this share of an interval.
    gather: the all-hosts gather of a small array (default `process_allgather`).
  """

  def __init__(self, global_batch: int, per_host_batch: int, *, process_count: int = 1,
               clock: Callable[[], float] = time.perf_counter,
               warn_fraction: float = WARN_FRACTION,
               gather: Callable[[np.ndarray], np.ndarray] = _allgather):
    self.global_batch, self.per_host_batch = int(global_batch), int(per_host_batch)
    self.process_count = int(process_count)
    self.clock, self.warn_fraction, self.gather = clock, float(warn_fraction), gather
    self.warned = False
    self.intervals = 0
    self.start()

  def start(self) -> None:
    """Starts an interval (the constructor starts the first)."""
    self.wait_s = 0.0
    self.excluded_s = 0.0
    self.steps = 0
    self._t0 = self.clock()

  def next(self, iterator: Iterator) -> Any:
    """`next(iterator)`, its time counted as waiting; one step of the interval."""
    t0 = self.clock()
    batch = next(iterator)
    self.wait_s += self.clock() - t0
    self.steps += 1
    return batch

  @contextlib.contextmanager
  def excluded(self):
    """Time in this block (evaluations, checkpoint saves) is neither waiting nor the step."""
    t0 = self.clock()
    try:
      yield
    finally:
      self.excluded_s += self.clock() - t0

  def interval(self) -> dict[str, float]:
    """The figures of the interval since `start()`, and starts the next one.

    Returns:
      dict(data_wait_fraction, data_wait_s, input_clips_per_s, step_clips_per_s, steps_per_s,
      clips_per_s, interval_s); with several hosts also data_wait_fraction_worst and
      data_wait_worst_host.
    """
    elapsed = max(self.clock() - self._t0 - self.excluded_s, 1e-9)
    wait = min(self.wait_s, elapsed)
    steps = self.steps
    out = dict(data_wait_fraction=wait / elapsed, data_wait_s=wait,
               input_clips_per_s=steps * self.per_host_batch / elapsed,
               steps_per_s=steps / elapsed, clips_per_s=steps * self.global_batch / elapsed,
               interval_s=elapsed)
    worst_wait, worst = wait, out["data_wait_fraction"]
    if self.process_count > 1:
      both = self.gather(np.array([wait, elapsed], np.float64)).reshape(-1, 2)
      fractions = both[:, 0] / np.maximum(both[:, 1], 1e-9)
      host = int(np.argmax(fractions))
      worst, worst_wait = float(fractions[host]), float(both[host, 0])
      out.update(data_wait_fraction_worst=worst, data_wait_worst_host=float(host))
    out["step_clips_per_s"] = steps * self.global_batch / max(elapsed - worst_wait, 1e-9)
    self.intervals += 1
    if self.intervals > 1 and worst > self.warn_fraction and not self.warned:
      self.warned = True
      where = (f" (host {int(out['data_wait_worst_host'])} of {self.process_count})"
               if self.process_count > 1 else "")
      logging.warning(
          "the input pipeline holds up training: %.0f%% of the last %d steps waited for the "
          "next batch%s (more than %.0f%%); the pipeline delivered %.1f clips/s per host, "
          "the step could take %.1f clips/s. To feed it faster: %s. (Said once.)",
          100 * worst, steps, where, 100 * self.warn_fraction, out["input_clips_per_s"],
          out["step_clips_per_s"], KNOBS)
    self.start()
    return out
