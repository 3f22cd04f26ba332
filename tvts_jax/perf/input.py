"""The input pipeline's throughput, alone and feeding the trainer's step.

TensorFlow (tf.data, through `tvts_jax.input_pipeline`) and the demo-data generator are imported
by these functions only, when called: importing this module needs JAX alone.
"""

from __future__ import annotations

import ast
import math
import os
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections

from tvts_jax.perf import step

# One H200's step on the paper config at batch 256 with cuDNN attention (docs/benchmarks.md):
# the rate one accelerator consumes clips at, for the cores-per-accelerator figure.
H200_PAPER_CLIPS_PER_S = 1190.0
# Keys of an --input_variant that choose the records rather than the config.
RECORD_KEYS = ("short_side", "jpeg_quality")


def local_cores() -> int:
  """CPU cores this process may run on (its affinity mask, e.g. a container's share)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cores_needed(clips_per_s_per_core: float, accelerator_clips_per_s: float) -> int:
  """Cores whose pipelines, at `clips_per_s_per_core` each, feed one accelerator's step."""
  if clips_per_s_per_core <= 0:
    raise ValueError(f"clips_per_s_per_core={clips_per_s_per_core} must be positive")
  return math.ceil(accelerator_clips_per_s / clips_per_s_per_core - 1e-9)


def cores_report(clips_per_s_per_core: float, clips_per_cpu_s: float,
                 accelerator_clips_per_s: float, source: str) -> dict[str, Any]:
  """How many cores one accelerator consuming `accelerator_clips_per_s` needs.

  Two figures: from the wall-clock rate per core (what this machine gave, its load included)
  and from the rate per CPU-second the pipeline used (what a core gives when it does nothing
  else: the figure to size a dedicated host with).
  """
  return dict(accelerator_clips_per_s=accelerator_clips_per_s, accelerator_rate=source,
              cores_per_accelerator=cores_needed(clips_per_s_per_core,
                                                 accelerator_clips_per_s),
              cores_per_accelerator_cpu_s=cores_needed(clips_per_cpu_s,
                                                       accelerator_clips_per_s))


def demo_records(config: ml_collections.ConfigDict, directory: str, num_videos: int,
                 log: Callable[[str], None] = print, *, short_side: int | None = None,
                 jpeg_quality: int = 90, tokenizer: str | None = None) -> dict[str, str]:
  """Synthetic records (and their tokenizer) at the config's resolution.

  The frames are stored with short side config.data.resize_short (or `short_side`), like
  prepared real videos, so the pipeline decodes and crops the same number of pixels as on real
  data. Synthetic frames (flat shapes on a smooth background) compress better than camera
  frames: their JPEGs are smaller and decode faster.

  Args:
    config: the run config (data.resize_short, demo.*).
    directory: where to write (the default set goes to a `demo-<hash>` folder in it, the
      others to `synthetic-<short_side>-q<quality>`).
    num_videos: videos to generate.
    log: progress output.
    short_side: stored frames' short side (default data.resize_short).
    jpeg_quality: their JPEG quality.
    tokenizer: reuse this tokenizer (sets other than the default; default: train one).

  Returns:
    dict(train=GLOB, tokenizer=PATH).
  """
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
  c = config.copy_and_resolve_references()
  short_side = int(short_side or c.data.resize_short)
  log(f"generating {num_videos} synthetic videos (short side {short_side}, JPEG quality "
      f"{jpeg_quality}) into {directory}")
  if short_side == c.data.resize_short and jpeg_quality == 90 and tokenizer is None:
    with c.unlocked():
      c.demo.num_train_videos = num_videos
      c.demo.num_eval_videos = 1
    paths = synthetic.ensure_demo_data(c, directory, verbose=False)
    return {"train": paths["train"], "tokenizer": paths["tokenizer"]}
  out = os.path.join(directory, f"synthetic-{short_side}-q{jpeg_quality}")
  synthetic.generate(out, num_videos, seed=synthetic.DEMO_SEED, split="train", num_shards=16,
                     short_side=short_side, jpeg_quality=jpeg_quality, name="demo",
                     verbose=False)
  train_glob = os.path.join(out, "demo-train.tfrecord-*")
  if tokenizer is None:
    from data_pipelines import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
    tokenizer = tok_lib.train(tok_lib.iter_transcripts(train_glob), int(c.demo.vocab_size),
                              os.path.join(out, "spm.model"))
  return {"train": train_glob, "tokenizer": tokenizer}


def parse_variant(text: str) -> dict[str, Any]:
  """'KEY=VALUE,KEY=VALUE' (config keys such as data.samples_per_visit, or the records' own
  short_side and jpeg_quality) -> {KEY: VALUE}; '' or 'base' is the config as it is."""
  out = {}
  for item in filter(None, (x.strip() for x in text.split(","))):
    if item == "base":
      continue
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--input_variant item {item!r} is not KEY=VALUE")
    try:
      out[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[key.strip()] = value.strip()
  return out


def variant_config(config: ml_collections.ConfigDict,
                   overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """The config with a variant's config keys set (the record keys are not config keys)."""
  from tvts_jax import config_schema  # pylint: disable=g-import-not-at-top
  c = config.copy_and_resolve_references()
  with c.unlocked():
    for key, value in overrides.items():
      if key in RECORD_KEYS:
        continue
      *parents, leaf = key.split(".")
      node = c
      for p in parents:
        node = node[p]
      if leaf not in node:
        raise KeyError(f"--input_variant: no config key {key!r}")
      node[leaf] = type(node[leaf])(value) if isinstance(node[leaf], (int, float)) else value
  return config_schema.validate(c)


def compare_input(config: ml_collections.ConfigDict, variants: Sequence[dict[str, Any]],
                  records_of: Callable[[dict[str, Any]], tuple[str, str]], *, batches: int,
                  rounds: int, drain: int = 3,
                  log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """The input pipeline alone under several variants, side by side in one process.

  Each round times `batches` batches of each variant in turn, each in a fresh iterator that
  only lives for its block (so no other variant's pipeline refills its buffers meanwhile),
  after `drain` untimed batches (starting the pipeline, filling it). Medians over the rounds.

  Args:
    config: the run config.
    variants: overrides, as `parse_variant` gives them.
    records_of: variant -> (records glob, tokenizer).
    batches: timed batches per variant and round.
    rounds: rounds.
    drain: untimed batches before each timed block.
    log: progress output.

  Returns:
    Per variant: dict(variant, clips_per_s, clips_per_s_per_core, clips_per_cpu_s (medians),
    per_round_clips_per_s, cores, batch_size, valid_rate, frames, image_size).
  """
  from tvts_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  import gc  # pylint: disable=g-import-not-at-top
  cores = local_cores()
  runs = [dict(variant=v, config=variant_config(config, v), records=records_of(v), wall=[],
               cpu=[]) for v in variants]
  for r in range(rounds):
    for run in runs:
      records, tokenizer = run["records"]
      it = input_pipeline.make_train_iterator(run["config"], records, tokenizer,
                                              start_step=r, process_index=0, process_count=1)
      for _ in range(1 + drain):
        next(it)
      t0, cpu0 = time.perf_counter(), time.process_time()
      for _ in range(batches):
        next(it)
      clips = batches * it.per_host_batch
      run["wall"].append(clips / (time.perf_counter() - t0))
      run["cpu"].append(clips / max(time.process_time() - cpu0, 1e-9))
      run["valid_rate"], run["batch_size"] = it.valid_rate, it.per_host_batch
      del it
      gc.collect()  # the iterator's threads stop with it, before the next variant runs
    log(f"round {r + 1}/{rounds}: " + "; ".join(
        f"{describe(run['variant'])} {run['wall'][-1]:.1f} clips/s" for run in runs
        if len(run["wall"]) == r + 1))
  out = []
  for run in runs:
    wall, c = statistics.median(run["wall"]), run["config"]
    out.append(dict(variant=describe(run["variant"]), clips_per_s=wall,
                    clips_per_s_per_core=wall / cores,
                    clips_per_cpu_s=statistics.median(run["cpu"]),
                    per_round_clips_per_s=run["wall"], cores=cores,
                    batch_size=run["batch_size"], valid_rate=run["valid_rate"],
                    frames=int(c.data.num_frames), image_size=int(c.data.image_size)))
  return out


def describe(variant: dict[str, Any]) -> str:
  return ",".join(f"{k}={v}" for k, v in variant.items()) or "base"


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
