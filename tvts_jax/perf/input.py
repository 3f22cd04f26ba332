"""The input pipeline's throughput, alone and feeding the trainer's step.

TensorFlow (tf.data, through `tvts_jax.input_pipeline`) and the demo-data generator are imported
by these functions only, when called: importing this module needs JAX alone.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import ml_collections

from tvts_jax.perf import step


def demo_records(config: ml_collections.ConfigDict, directory: str, num_videos: int,
                 log: Callable[[str], None] = print) -> dict[str, str]:
  """Synthetic demo records (and their tokenizer) at the config's resolution.

  The frames are stored with short side config.data.resize_short, like prepared real videos,
  so the pipeline decodes and crops the same number of pixels as on real data.

  Returns:
    dict(train=GLOB, tokenizer=PATH).
  """
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.demo.num_train_videos = num_videos
    c.demo.num_eval_videos = 1
  log(f"generating {num_videos} synthetic videos (short side {c.data.resize_short}) "
      f"into {directory}")
  paths = synthetic.ensure_demo_data(c, directory, verbose=False)
  return {"train": paths["train"], "tokenizer": paths["tokenizer"]}


def benchmark_input(trainer, config, records: str, tokenizer: str, *, batches: int,
                    steps: int, warmup: int) -> dict[str, Any]:
  """Clips/s of the input pipeline alone, then of the pipeline feeding the trainer's step.

  Args:
    trainer: a `train.Trainer`.
    config: the run config; its batch_size and data.* shape the pipeline.
    records: glob(s) of training records.
    tokenizer: sentencepiece model.
    batches: batches the pipeline alone is timed over.
    steps: steps timed together (after `warmup` untimed ones, which include compiling the
      step for the pipeline's transcript length if it differs from the synthetic one).
    warmup: untimed steps.

  Returns:
    `input_*` keys from `input_pipeline.measure_throughput` and `together_step_time_s`,
    `together_clips_per_s` (median over the timed steps).
  """
  from tvts_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  alone = input_pipeline.measure_throughput(config, records, tokenizer, batches)
  report = {f"input_{k}": v for k, v in alone.items()}
  it = input_pipeline.make_train_iterator(config, records, tokenizer)
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    metrics = trainer.step(next(it))
    jax.block_until_ready((trainer.state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  step_time = step.median(times)
  report.update(together_step_time_s=step_time,
                together_clips_per_s=config.batch_size / step_time,
                together_step_times_s=times)
  return report
