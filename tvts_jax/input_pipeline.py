"""tf.data input pipeline: record shards -> sampled spans, clips, frames and transcripts -> batches.

    python -m tvts_jax.input_pipeline --config=configs/demo.py \
        --records='DATA/demo-train.tfrecord-*' --tokenizer=DATA/spm.model --batches=50

(measures the pipeline alone and prints clips/s as a final JSON line.)

The batch dict: the only contract between data and model
---------------------------------------------------------
Every iterator yields per-host numpy batches (B = global batch // process_count):

| key           | dtype / shape       | meaning                                                  |
|---------------|---------------------|----------------------------------------------------------|
| `video`       | uint8 [B,T,H,W,3]   | T frames over the span, RGB 0..255, H = W = image_size.  |
|               |                     | Not normalised: the model normalises on device.          |
| `text_ids`    | int32 [B,K,L]       | the K transcripts in SHUFFLED order, the read-out token  |
|               |                     | first (BOS / [CLS]: data_pipelines/tokenizer.py).        |
| `text_mask`   | bool  [B,K,L]       | True on real tokens (a prefix; at least the first).      |
| `order`       | int32 [B,K]         | order[b, k] = the clip index (0..K-1, in time) of        |
|               |                     | transcript k: the sort target. A permutation.            |
| `valid`       | bool  [B]           | False: mask the example out of every loss and metric    |
|               |                     | (no span with words in every clip, or eval padding).     |
| `clip_labels` | int32 [B,K]         | action label of the segment overlapping clip k (in time  |
|               |                     | order) the most; -1 if none. For evaluation.             |
| `label`       | int32 [B]           | the record's label, -1 if none. For evaluation.          |

How one example is drawn from one record: `tvts_jax/sampling.py`. Labelled videos for the
probes: `tvts_jax/labelled.py`.

Determinism and resume
----------------------
Every random choice is a stateless function of (config.seed, process_index, epoch, position in the
epoch, and with `data.samples_per_visit` = n > 1 the example's index j < n in the visit); the file
order of an epoch is a seeded permutation, the interleave is deterministic, the shuffle buffer is
seeded per epoch and parallel maps keep their order. So the stream is a pure function of the step:
`make_train_iterator(..., start_step=s)` yields exactly the batches an uninterrupted iterator yields
from step s. It skips whole epochs arithmetically (per-file record counts from `dataset_info.json`,
key `shard_counts`; files without it are counted once by reading) and the rest of an epoch on
serialised records, so resuming never decodes the skipped examples. Evaluation examples are sampled
with a seed derived from the record's `video_id`, so every evaluation sees the same clips. """

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Iterator, Sequence

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf

from data_pipelines import records
from data_pipelines import tokenizer as tokenizer_lib
from tvts_jax import sampling

# Keys of the batch dict (the contract above).
BATCH_KEYS = ("video", "text_ids", "text_mask", "order", "valid", "clip_labels", "label")
_EXAMPLE_KEYS = ("video", "texts", "order", "valid", "clip_labels", "label")
# Training examples also carry `shortened`, which `BatchIterator` counts and takes out.
_TRAIN_KEYS = _EXAMPLE_KEYS + ("shortened",)
# Stream tags folded into the seeds so that training and evaluation draws never coincide.
_TRAIN_TAG, _EVAL_TAG = 1, 2
_MAX_CYCLE = 16  # files read at once: more mixing, more open files and read buffers


# ---------------------------------------------------------------------------------------------
# Files.


def resolve_data(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """Record globs and tokenizer of a run; generates the demo data when no records are set.

  Returns:
    dict(train=GLOB, eval=GLOB or '', tokenizer=PATH, demo=bool): with empty
    `data.train_records`, the built-in demo data under `WORKDIR/demo_data` (generated once, by
    process 0, and read by every host).
  """
  d = config.data
  if d.train_records:
    if not d.tokenizer:
      raise ValueError("data.train_records is set but data.tokenizer is not: train one with "
                       "`python -m data_pipelines.tokenizer`, or pass the tokenizer.json of "
                       "the pretrained text tower")
    return {"train": d.train_records, "eval": d.eval_records, "tokenizer": d.tokenizer,
            "demo": False}
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, "demo_data")
  if jax.process_index() == 0:
    paths = synthetic.ensure_demo_data(config, directory)
  multihost_utils.sync_global_devices("demo data")
  if jax.process_index() != 0:
    paths = synthetic.ensure_demo_data(config, directory)  # exists now: only reads it
  return {**paths, "demo": True}




def list_files(records_pattern: str | Sequence[str]) -> list[str]:
  """Sorted record files of one or more globs (a comma-separated string or a list).

  Args:
    records_pattern: glob(s) of TFRecord shards; a directory means every `*.tfrecord*` in it.

  Returns:
    The sorted, de-duplicated file list.
  """
  patterns = (records_pattern.split(",") if isinstance(records_pattern, str)
              else list(records_pattern))
  files = set()
  for p in (p.strip() for p in patterns):
    if not p:
      continue
    if tf.io.gfile.isdir(p):
      p = os.path.join(p, "*.tfrecord*")
    files.update(tf.io.gfile.glob(p))
  if not files:
    raise FileNotFoundError(f"no record files match {records_pattern!r}")
  return sorted(files)


def host_files(files: Sequence[str], process_index: int, process_count: int) -> list[str]:
  """The files of one host: sorted files[process_index::process_count].

  Args:
    files: all record files.
    process_index: this host's index.
    process_count: number of hosts.

  Returns:
    This host's files (disjoint from the other hosts', all hosts together cover `files`).
  """
  if len(files) < process_count:
    raise ValueError(
        f"{len(files)} record files for {process_count} hosts: every host needs at least one "
        "file; write the data with more shards (e.g. prepare --num_shards) or use fewer hosts")
  return sorted(files)[process_index::process_count]


def _record_counts(files: Sequence[str], skip_corrupt: bool) -> list[int]:
  """Records per file, from dataset_info.json `shard_counts` or else by reading the file."""
  infos = {}
  counts = []
  for f in files:
    directory, name = os.path.split(f)
    if directory not in infos:
      try:
        infos[directory] = records.read_info(directory).get("shard_counts", {})
      except tf.errors.NotFoundError:
        infos[directory] = {}
    if name in infos[directory]:
      counts.append(int(infos[directory][name]))
    else:
      logging.info("no record count for %s in dataset_info.json; counting it", f)
      ds = tf.data.TFRecordDataset(f)
      if skip_corrupt:
        ds = ds.ignore_errors(log_warning=True)
      counts.append(int(ds.reduce(np.int64(0), lambda n, _: n + 1)))
  return counts


def read_file(filename: tf.Tensor, skip_corrupt: bool) -> tf.data.Dataset:
  ds = tf.data.TFRecordDataset(filename, buffer_size=1 << 20)
  if skip_corrupt:
    # Per file, so a file cut in the middle ends that file only (with a logged warning) and the
    # reader carries on with the next; its records before the cut are kept.
    ds = ds.ignore_errors(log_warning=True)
  return ds


def _check_readable(files: Sequence[str], skip_corrupt: bool) -> None:
  """Raises unless some file has a readable first record.

  Without one, the training stream would be empty: every epoch would skip every file and the
  iterator would spin forever instead of failing. Reads one record of the first good file.
  """
  for f in files:
    for _ in read_file(f, skip_corrupt).take(1):
      return
  raise ValueError(f"none of this host's {len(files)} record files has a readable record "
                   f"(corrupt, empty or cut before the first record): {list(files)[:5]}")


# ---------------------------------------------------------------------------------------------
# Tokenizing and batching.





def _tokenize_batch(batch: dict[str, tf.Tensor], tokenizer_path: str,
                    text_len: int) -> dict[str, tf.Tensor]:
  """Tokenizes the [B, K] transcripts of a batch in one Python call."""
  def encode(texts):
    flat = [t.decode() for t in texts.reshape(-1)]
    ids, mask = tokenizer_lib.load_cached(tokenizer_path).encode(flat, text_len)
    return ids.reshape(texts.shape + (text_len,)), mask.reshape(texts.shape + (text_len,))

  texts = batch.pop("texts")
  ids, mask = tf.numpy_function(encode, [texts], [tf.int32, tf.bool], stateful=False)
  shape = tf.concat([tf.shape(texts), [text_len]], 0)
  batch["text_ids"] = tf.reshape(ids, shape)
  batch["text_mask"] = tf.reshape(mask, shape)
  return batch


def parallel_calls(config) -> int:
  """Examples sampled at once (`data.parallel_calls`; 0 = tf.data.AUTOTUNE)."""
  return int(config.data.get("parallel_calls", 0)) or tf.data.AUTOTUNE


def host_memory(config, per_host_batch: int) -> dict[str, Any]:
  """Host memory of the batches in flight: one batch's bytes and the bound on those held.

  Returns:
    dict(batch_bytes (video + token ids and masks), prefetch_batches (or 'autotune'),
    in_flight_bytes: (prefetch_batches + 2) batches (the prefetched ones, the one being
    assembled, the one the trainer holds), None with AUTOTUNE (tf.data then bounds its buffers
    by its own RAM budget)).
  """
  d = config.data
  video = per_host_batch * d.num_frames * d.image_size ** 2 * 3
  text = per_host_batch * d.num_clips * d.text_len * (4 + 1)
  prefetch = int(d.get("prefetch_batches", 0))
  return dict(batch_bytes=video + text, prefetch_batches=prefetch or "autotune",
              in_flight_bytes=(prefetch + 2) * (video + text) if prefetch else None)


def _flatten_visits(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """[V, n, ...] (V visits of n examples) -> [V * n, ...], visit-major: no copy (a reshape)."""
  return {k: tf.reshape(v, tf.concat([[-1], tf.shape(v)[2:]], 0)) for k, v in batch.items()}


def _finish(ds: tf.data.Dataset, config, batch_size: int, tokenizer_path: str,
            visits_of: int = 1):
  """Batches, tokenizes and prefetches; elements of `visits_of` > 1 examples are whole visits."""
  if visits_of > 1:  # batch_size // visits_of visits a batch, flattened
    ds = ds.batch(batch_size // visits_of, drop_remainder=True).map(_flatten_visits)
  else:
    ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.map(functools.partial(_tokenize_batch, tokenizer_path=tokenizer_path,
                                text_len=int(config.data.text_len)),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.prefetch(int(config.data.get("prefetch_batches", 0)) or tf.data.AUTOTUNE)
  opts = tf.data.Options()
  opts.deterministic = True
  # One thread per op: tf.data's parallelism across examples is the efficient kind here.
  opts.threading.max_intra_op_parallelism = 1
  if config.data.get("threads", 0):
    opts.threading.private_threadpool_size = int(config.data.threads)
  return ds.with_options(opts)


def split_batch(global_batch: int, process_count: int, what: str) -> int:
  if global_batch % process_count:
    raise ValueError(f"{what}={global_batch} is not divisible by the {process_count} hosts")
  return global_batch // process_count


def process_of(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  return process_index, process_count


class BatchIterator:
  """Iterator of per-host numpy batch dicts that counts the invalid examples it passed on.

  Attributes:
    dataset: the underlying tf.data.Dataset.
    per_host_batch: examples per batch.
    num_examples: examples yielded so far.
    num_invalid: of which valid=False (e.g. no span with words in every clip).
    num_shortened: of which the video was shorter than every span, so the span was shortened
      to [0, duration - 1] (`sampling._choose_span`); valid or not.
  """

  def __init__(self, dataset: tf.data.Dataset, per_host_batch: int):
    self.dataset = dataset
    self.per_host_batch = per_host_batch
    self._iterator = dataset.as_numpy_iterator()
    self.num_examples = 0
    self.num_invalid = 0
    self.num_shortened = 0

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    self.num_examples += batch["valid"].size
    self.num_invalid += int(np.sum(~batch["valid"]))
    if "shortened" in batch:  # a statistic, not part of the batch contract
      self.num_shortened += int(np.sum(batch.pop("shortened")))
    return batch

  @property
  def valid_rate(self) -> float:
    """Fraction of the examples so far that were valid (1.0 before the first batch)."""
    return 1.0 - self.num_invalid / max(self.num_examples, 1)


# ---------------------------------------------------------------------------------------------
# Training and evaluation streams.


def _train_key(config, process_index: int) -> tf.Tensor:
  base = tf.constant([int(config.seed), _TRAIN_TAG], tf.int64)
  return tf.random.experimental.stateless_fold_in(base, process_index)


def make_train_dataset(config: ml_collections.ConfigDict, records_pattern, tokenizer_path: str,
                       *, start_step: int = 0, process_index: int | None = None,
                       process_count: int | None = None) -> tuple[tf.data.Dataset, int]:
  """The infinite training tf.data.Dataset of one host (see `make_train_iterator`).

  Args:
    config: the run config.
    records_pattern: glob(s) of the training shards.
    tokenizer_path: sentencepiece model.
    start_step: first step of the stream.
    process_index: this host (default jax.process_index()).
    process_count: number of hosts (default jax.process_count()).

  Returns:
    (dataset, per-host batch size).
  """
  process_index, process_count = process_of(process_index, process_count)
  batch_size = split_batch(int(config.batch_size), process_count, "batch_size")
  skip_corrupt = bool(config.data.skip_corrupt_files)
  files = host_files(list_files(records_pattern), process_index, process_count)
  _check_readable(files, skip_corrupt)
  o = sampling.options(config)
  base = _train_key(config, process_index)

  # With samples_per_visit = n, each record visit gives n adjacent examples: the stream's
  # example e is example e % n of visit e // n.
  n = o["samples_per_visit"]
  start_visit, start_within = divmod(int(start_step) * batch_size, n)
  first_epoch, offset = 0, start_visit
  if start_visit:
    epoch_size = sum(_record_counts(files, skip_corrupt))
    if not epoch_size:
      raise ValueError(f"no records in {files}")
    first_epoch, offset = divmod(start_visit, epoch_size)

  files_t = tf.constant(files)
  cycle = min(len(files), _MAX_CYCLE)
  shuffle_buffer = max(1, int(config.data.shuffle_buffer))

  def epoch_records(epoch):
    epoch_key = tf.random.experimental.stateless_fold_in(base, epoch)
    order = tf.argsort(tf.random.stateless_uniform([len(files)], epoch_key))
    ds = tf.data.Dataset.from_tensor_slices(tf.gather(files_t, order))
    ds = ds.interleave(functools.partial(read_file, skip_corrupt=skip_corrupt),
                       cycle_length=cycle, block_length=1,
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # An op-level seed per epoch: the same buffer order whenever this epoch is replayed.
    ds = ds.shuffle(shuffle_buffer, seed=epoch_key[1] % (2**31 - 1),
                    reshuffle_each_iteration=False)
    return ds.enumerate().map(lambda i, s: (epoch, i, s))

  ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch_records)
  # Skipping serialised records: nothing is parsed or decoded (at most one epoch of reads).
  ds = ds.skip(offset)

  def example(epoch, index, serialized):
    key = tf.random.experimental.stateless_fold_in(
        tf.random.experimental.stateless_fold_in(base, epoch), index)
    if n == 1:
      out = sampling.sample_example(records.parse(serialized), key, o)
    else:  # [n, ...]: the visit's examples
      out = sampling.sample_examples(records.parse(serialized), key, o, n)
    return {name: out[name] for name in _TRAIN_KEYS}

  ds = ds.map(example, num_parallel_calls=parallel_calls(config), deterministic=True)
  if n > 1 and batch_size % n == 0:
    # Batches of whole visits (start_within is 0): reshaped to examples, not copied one by one
    # as unbatch would.
    return _finish(ds, config, batch_size, tokenizer_path, visits_of=n), batch_size
  if n > 1:  # visits straddle batches
    ds = ds.unbatch().skip(start_within)
  return _finish(ds, config, batch_size, tokenizer_path), batch_size


def make_train_iterator(config: ml_collections.ConfigDict, records_pattern, tokenizer_path: str,
                        *, start_step: int = 0, process_index: int | None = None,
                        process_count: int | None = None) -> BatchIterator:
  """Infinite iterator of this host's training batches (the dict in the module docstring).

  Args:
    config: the run config (reads seed, batch_size, data.*).
    records_pattern: glob(s) of the training shards (comma-separated string or list).
    tokenizer_path: sentencepiece model.
    start_step: the first batch is the one an uninterrupted iterator yields at this step.
    process_index: this host (default jax.process_index()).
    process_count: number of hosts (default jax.process_count()).

  Returns:
    A `BatchIterator` of per-host batches of config.batch_size // process_count examples;
    its `valid_rate` / `num_invalid` count the examples emitted with valid=False, and
    `num_shortened` those of videos shorter than every span.
  """
  ds, batch_size = make_train_dataset(config, records_pattern, tokenizer_path,
                                      start_step=start_step, process_index=process_index,
                                      process_count=process_count)
  mem = host_memory(config, batch_size)
  logging.info("input pipeline: %d examples a batch, %.1f MiB; %s batches prefetched%s; %d "
               "example(s) per record read", batch_size, mem["batch_bytes"] / 2**20,
               mem["prefetch_batches"],
               f" (at most ~{mem['in_flight_bytes'] / 2**20:.0f} MiB in flight)"
               if mem["in_flight_bytes"] else "", int(config.data.get("samples_per_visit", 1)))
  return BatchIterator(ds, batch_size)


class EvalBatches:
  """Re-iterable evaluation batches: each pass yields the same `len(self)` batches."""

  def __init__(self, dataset: tf.data.Dataset, num_batches: int, per_host_batch: int):
    self.dataset = dataset
    self.num_batches = num_batches
    self.per_host_batch = per_host_batch

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self.dataset.as_numpy_iterator()


def make_eval_iterator(config: ml_collections.ConfigDict, records_pattern, tokenizer_path: str,
                       *, seed_offset: int = 0, process_index: int | None = None,
                       process_count: int | None = None) -> EvalBatches:
  """Exactly config.data.eval_batches per-host batches, the same on every pass.

  This host reads its files in sorted order, once; every record is sampled with a key derived
  from (config.seed + seed_offset, its video_id), so its clips do not depend on the number of
  hosts or on when the evaluation runs. Records beyond eval_batches batches are not used; if
  there are fewer, the batches are padded with valid=False examples, so every host runs the same
  number of batches.

  Args:
    config: the run config (reads seed, batch_size, data.*).
    records_pattern: glob(s) of the evaluation shards.
    tokenizer_path: sentencepiece model.
    seed_offset: added to config.seed, to draw a different but fixed set of clips.
    process_index: this host (default jax.process_index()).
    process_count: number of hosts (default jax.process_count()).

  Returns:
    An `EvalBatches` (re-iterable, len() = eval_batches) of batch dicts.
  """
  process_index, process_count = process_of(process_index, process_count)
  global_batch = int(config.data.eval_batch_size or config.batch_size)
  batch_size = split_batch(global_batch, process_count, "eval batch size")
  num_batches = int(config.data.eval_batches)
  skip_corrupt = bool(config.data.skip_corrupt_files)
  files = host_files(list_files(records_pattern), process_index, process_count)
  o = sampling.options(config)
  base = tf.constant([int(config.seed) + int(seed_offset), _EVAL_TAG], tf.int64)

  ds = tf.data.Dataset.from_tensor_slices(files).interleave(
      functools.partial(read_file, skip_corrupt=skip_corrupt),
      cycle_length=min(len(files), _MAX_CYCLE), block_length=1,
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.take(num_batches * batch_size)

  def example(serialized):
    ex = records.parse(serialized)
    key = tf.random.experimental.stateless_fold_in(
        base, tf.strings.to_hash_bucket_fast(ex["video_id"], np.iinfo(np.int64).max))
    out = sampling.sample_example(ex, key, o)
    return {name: out[name] for name in _EXAMPLE_KEYS}

  ds = ds.map(example, num_parallel_calls=parallel_calls(config), deterministic=True)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(sampling.padding_example(o)).repeat())
  ds = ds.take(num_batches * batch_size)
  return EvalBatches(_finish(ds, config, batch_size, tokenizer_path), num_batches, batch_size)


# ---------------------------------------------------------------------------------------------
# Throughput.


def measure_throughput(config: ml_collections.ConfigDict, records_pattern, tokenizer_path: str,
                       num_batches: int, warmup_batches: int = 2) -> dict[str, Any]:
  """Clips per second of the training pipeline alone (one host, all local CPU cores).

  Args:
    config: the run config.
    records_pattern: glob(s) of training shards.
    tokenizer_path: sentencepiece model.
    num_batches: batches timed (after `warmup_batches` untimed ones, which include tracing
      and filling the buffers).
    warmup_batches: batches drawn before the clock starts.

  Returns:
    dict(clips_per_s, clips_per_s_per_core (clips_per_s / local cores), clips_per_cpu_s
    (clips per CPU-second this process used: the per-core rate that does not depend on what
    else runs on the machine), cores, batch_size, batches, seconds, cpu_seconds, valid_rate,
    shortened (examples with a shortened span), frames, image_size).
  """
  it = make_train_iterator(config, records_pattern, tokenizer_path, process_index=0,
                           process_count=1)
  for _ in range(warmup_batches):
    next(it)
  t0, cpu0 = time.perf_counter(), time.process_time()
  for _ in range(num_batches):
    next(it)
  seconds = time.perf_counter() - t0
  cpu_seconds = time.process_time() - cpu0
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  clips = num_batches * it.per_host_batch
  return dict(clips_per_s=clips / seconds, clips_per_s_per_core=clips / seconds / cores,
              clips_per_cpu_s=clips / cpu_seconds, cores=cores,
              batch_size=it.per_host_batch, batches=num_batches, seconds=seconds,
              cpu_seconds=cpu_seconds, valid_rate=it.valid_rate, shortened=it.num_shortened,
              frames=int(config.data.num_frames), image_size=int(config.data.image_size))


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  # Hide GPUs from TF: the pipeline runs on the CPU and must leave accelerators to JAX.
  tf.config.set_visible_devices([], "GPU")
  f = flags.FLAGS
  from tvts_jax import config_schema  # pylint: disable=g-import-not-at-top
  result = measure_throughput(config_schema.validate(f.config), f.records, f.tokenizer,
                              f.batches)
  print(json.dumps(result))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "config file", lock_config=True)
  flags.DEFINE_string("records", None, "glob(s) of training shards", required=True)
  flags.DEFINE_string("tokenizer", None, "sentencepiece model", required=True)
  flags.DEFINE_integer("batches", 50, "batches to time")
  flags.mark_flags_as_required(["config"])
  app.run(main)
