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
| `text_ids`    | int32 [B,K,L]       | the K transcripts in SHUFFLED order, BOS first, 0 = pad. |
| `text_mask`   | bool  [B,K,L]       | True on real tokens (always at least the BOS).           |
| `order`       | int32 [B,K]         | order[b, k] = the clip index (0..K-1, in time) of        |
|               |                     | transcript k: the sort target. A permutation.            |
| `valid`       | bool  [B]           | False: mask the example out of every loss and metric    |
|               |                     | (no span with words in every clip, or eval padding).     |
| `clip_labels` | int32 [B,K]         | action label of the segment overlapping clip k (in time  |
|               |                     | order) the most; -1 if none. For evaluation.             |
| `label`       | int32 [B]           | the record's label, -1 if none. For evaluation.          |

Sampling one example (as implemented, parameterised by config.data)
--------------------------------------------------------------------
- Clip length L drawn uniformly from `clip_seconds` among the lengths whose span
  `K * L + (K - 1) * gap_seconds` fits in the video; span start uniform in
  [0, duration - span] (a continuous start: the reference's whole-second start plus sub-second
  jitter, kept inside the video). Clip i covers [start + i (L + gap), ... + L).
- Transcript i: the words whose START time lies in clip i, joined by spaces.
- Up to `span_tries` spans are drawn; the first whose every clip has >= `min_words_per_clip`
  words is used. If none has (or no length fits), the example is emitted with valid=False and
  a black video, so the stream stays one example per record visit.
- Frames: the span is cut into T equal segments; one uniform random time per segment; the
  stored frame nearest to it (chronological). Only those T JPEGs are decoded.
- One random image_size^2 crop shared by all frames. Frames stored with short side ==
  resize_short are decoded with `decode_and_crop_jpeg` (only the crop is decoded); others are
  decoded, resized to short side resize_short (bilinear, antialiased) and cropped. No flip.
- The transcripts are shuffled by a random permutation `order`.

Determinism and resume
----------------------
Every random choice is a stateless function of (config.seed, process_index, epoch, position in
the epoch); the file order of an epoch is a seeded permutation, the interleave is
deterministic, the shuffle buffer is seeded per epoch and parallel maps keep their order. So
the stream is a pure function of the step: `make_train_iterator(..., start_step=s)` yields
exactly the batches an uninterrupted iterator yields from step s. It skips whole epochs
arithmetically (per-file record counts from `dataset_info.json`, key `shard_counts`; files
without it are counted once by reading) and the rest of an epoch on serialised records, so
resuming never decodes the skipped examples. Evaluation examples are sampled with a seed
derived from the record's `video_id`, so every evaluation sees the same clips.
"""

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

# Keys of the batch dict (the contract above).
BATCH_KEYS = ("video", "text_ids", "text_mask", "order", "valid", "clip_labels", "label")
_EXAMPLE_KEYS = ("video", "texts", "order", "valid", "clip_labels", "label")
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


def _read_file(filename: tf.Tensor, skip_corrupt: bool) -> tf.data.Dataset:
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
    for _ in _read_file(f, skip_corrupt).take(1):
      return
  raise ValueError(f"none of this host's {len(files)} record files has a readable record "
                   f"(corrupt, empty or cut before the first record): {list(files)[:5]}")


# ---------------------------------------------------------------------------------------------
# Sampling one example.


def _options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  d = config.data
  return dict(num_clips=int(d.num_clips), num_frames=int(d.num_frames),
              image_size=int(d.image_size), resize_short=int(d.resize_short),
              clip_seconds=tuple(float(s) for s in d.clip_seconds),
              gap_seconds=float(d.gap_seconds), span_tries=max(1, int(d.span_tries)),
              min_words=int(d.min_words_per_clip))


def _first_true(x: tf.Tensor) -> tf.Tensor:
  """Index of the first True of a bool vector (its length if none)."""
  n = tf.size(x)
  return tf.reduce_min(tf.where(x, tf.range(n), n))


def _choose_span(ex: dict[str, tf.Tensor], keys: tf.Tensor, o: dict[str, Any]):
  """Draws `span_tries` spans at once and keeps the first whose every clip has enough words.

  Returns:
    (valid, clip_starts [K], clip_len, inside [K, num_words] word-in-clip mask).
  """
  k, tries = o["num_clips"], o["span_tries"]
  duration = ex["duration"]
  choices = tf.constant(o["clip_seconds"], tf.float32)
  fits = k * choices + (k - 1) * o["gap_seconds"] <= duration
  num_fit = tf.reduce_sum(tf.cast(fits, tf.int32))
  # A placeholder length where none fits keeps the shapes; such examples are invalid anyway.
  fitting = tf.concat([tf.boolean_mask(choices, fits), choices[:1]], 0)
  pick = tf.random.stateless_uniform([tries], keys[0])
  pick = tf.minimum(tf.cast(pick * tf.cast(tf.maximum(num_fit, 1), tf.float32), tf.int32),
                    tf.maximum(num_fit, 1) - 1)
  clip_len = tf.gather(fitting, pick)  # [tries]
  span = k * clip_len + (k - 1) * o["gap_seconds"]
  start = tf.random.stateless_uniform([tries], keys[1]) * tf.maximum(duration - span, 0.0)
  clip_starts = start[:, None] + tf.range(k, dtype=tf.float32)[None] * (
      clip_len + o["gap_seconds"])[:, None]  # [tries, K]
  clip_ends = clip_starts + clip_len[:, None]
  word_times = ex["word_starts"]
  inside = ((word_times[None, None, :] >= clip_starts[..., None]) &
            (word_times[None, None, :] < clip_ends[..., None]))  # [tries, K, words]
  counts = tf.reduce_sum(tf.cast(inside, tf.int32), -1)
  ok = tf.reduce_all(counts >= o["min_words"], -1) & (num_fit > 0)
  chosen = tf.minimum(_first_true(ok), tries - 1)
  return tf.reduce_any(ok), clip_starts[chosen], clip_len[chosen], inside[chosen]


def _clip_labels(ex: dict[str, tf.Tensor], clip_starts: tf.Tensor,
                 clip_len: tf.Tensor) -> tf.Tensor:
  """Label of the segment overlapping each clip the most; -1 where none overlaps."""
  # A zero-length dummy segment keeps argmax defined when a record has no segments.
  labels = tf.concat([tf.cast(ex["segment_labels"], tf.int32), [-1]], 0)
  seg_starts = tf.concat([ex["segment_starts"], [-1.0]], 0)
  seg_ends = tf.concat([ex["segment_ends"], [-1.0]], 0)
  clip_ends = clip_starts + clip_len
  overlap = tf.maximum(
      tf.minimum(clip_ends[:, None], seg_ends[None]) -
      tf.maximum(clip_starts[:, None], seg_starts[None]), 0.0)  # [K, segments]
  best = tf.argmax(overlap, axis=1, output_type=tf.int32)
  return tf.where(tf.reduce_max(overlap, 1) > 0, tf.gather(labels, best), -1)


def _crop_window(ex: dict[str, tf.Tensor], key: tf.Tensor, o: dict[str, Any]):
  """Size after resizing to short side resize_short, and a random crop offset in it."""
  height, width = tf.cast(ex["height"], tf.int32), tf.cast(ex["width"], tf.int32)
  short = tf.minimum(height, width)
  target = o["resize_short"]
  scale = target / tf.cast(short, tf.float64)
  new_h = tf.where(height == short, target,
                   tf.cast(tf.round(tf.cast(height, tf.float64) * scale), tf.int32))
  new_w = tf.where(width == short, target,
                   tf.cast(tf.round(tf.cast(width, tf.float64) * scale), tf.int32))
  u = tf.random.stateless_uniform([2], key)
  room = tf.stack([new_h, new_w]) - o["image_size"] + 1
  offset = tf.minimum(tf.cast(u * tf.cast(room, tf.float32), tf.int32), room - 1)
  return short == target, tf.stack([new_h, new_w]), offset


def _decode(jpegs: tf.Tensor, native: tf.Tensor, size: tf.Tensor, offset: tf.Tensor,
            o: dict[str, Any]) -> tf.Tensor:
  """Decodes and crops T frames (uint8 [T, S, S, 3])."""
  s, t = o["image_size"], o["num_frames"]
  # T is static: one decode op per frame instead of a map_fn loop lets the executor run the
  # decodes of one clip side by side and saves the loop's bookkeeping.

  def fast():
    window = tf.stack([offset[0], offset[1], s, s])
    return tf.stack([tf.image.decode_and_crop_jpeg(jpegs[i], window, channels=3)
                     for i in range(t)])

  def slow():
    def one(jpeg):
      image = tf.image.decode_jpeg(jpeg, channels=3)
      image = tf.image.resize(image, size, method="bilinear", antialias=True)
      image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
      return image[offset[0]:offset[0] + s, offset[1]:offset[1] + s]
    return tf.stack([one(jpegs[i]) for i in range(t)])

  return tf.cond(native, fast, slow)


def sample_example(ex: dict[str, tf.Tensor], key: tf.Tensor,
                   o: dict[str, Any]) -> dict[str, tf.Tensor]:
  """Samples one example from a parsed record with a stateless key.

  Args:
    ex: a record parsed by `records.parse`.
    key: int64 [2] stateless seed.
    o: sampling options (`_options(config)`).

  Returns:
    dict with `video`, `texts` (string [K], shuffled), `order`, `valid`, `clip_labels`,
    `label`, and for inspection `clip_texts` (string [K], in time order), `span_start`,
    `clip_len`, `clip_starts` [K], `frame_index` [T] and `crop` [2] (y, x offset after resize).
  """
  k, t, s = o["num_clips"], o["num_frames"], o["image_size"]
  keys = tf.random.experimental.stateless_split(key, num=5)
  valid, clip_starts, clip_len, inside = _choose_span(ex, keys[:2], o)
  num_frames = tf.size(ex["frames"])
  valid &= num_frames > 0

  words = tf.tile(ex["words"][None], [k, 1])
  clip_texts = tf.strings.reduce_join(tf.ragged.boolean_mask(words, inside), axis=1,
                                      separator=" ")
  order = tf.argsort(tf.random.stateless_uniform([k], keys[2]))

  span = k * clip_len + (k - 1) * o["gap_seconds"]
  span_start = clip_starts[0]
  times = span_start + (tf.range(t, dtype=tf.float32) +
                        tf.random.stateless_uniform([t], keys[3])) * (span / t)
  # An infinitely distant sentinel keeps argmin defined for a record without frames (such an
  # example is invalid and decodes nothing).
  frame_times = tf.concat([ex["frame_times"], [np.inf]], 0)
  frame_index = tf.argmin(tf.abs(frame_times[None, :] - times[:, None]), axis=1,
                          output_type=tf.int32)
  native, size, offset = _crop_window(ex, keys[4], o)
  video = tf.cond(
      valid,
      lambda: _decode(tf.gather(ex["frames"], frame_index), native, size, offset, o),
      lambda: tf.zeros([t, s, s, 3], tf.uint8))
  return dict(
      video=tf.ensure_shape(video, [t, s, s, 3]),
      texts=tf.gather(clip_texts, order),
      order=order,
      valid=valid,
      clip_labels=_clip_labels(ex, clip_starts, clip_len),
      label=tf.cast(ex["label"], tf.int32),
      clip_texts=clip_texts,
      span_start=span_start,
      clip_len=clip_len,
      clip_starts=clip_starts,
      frame_index=frame_index,
      crop=offset)


def _padding_example(o: dict[str, Any]) -> dict[str, tf.Tensor]:
  k, t, s = o["num_clips"], o["num_frames"], o["image_size"]
  return dict(video=tf.zeros([t, s, s, 3], tf.uint8), texts=tf.fill([k], ""),
              order=tf.range(k, dtype=tf.int32), valid=tf.constant(False),
              clip_labels=tf.fill([k], -1), label=tf.constant(-1))


# ---------------------------------------------------------------------------------------------
# Tokenizing and batching.


@functools.lru_cache(maxsize=None)
def _tokenizer(path: str) -> tokenizer_lib.Tokenizer:
  return tokenizer_lib.Tokenizer(path)


def _tokenize_batch(batch: dict[str, tf.Tensor], tokenizer_path: str,
                    text_len: int) -> dict[str, tf.Tensor]:
  """Tokenizes the [B, K] transcripts of a batch in one Python call."""
  def encode(texts):
    flat = [t.decode() for t in texts.reshape(-1)]
    ids, mask = _tokenizer(tokenizer_path).encode(flat, text_len)
    return ids.reshape(texts.shape + (text_len,)), mask.reshape(texts.shape + (text_len,))

  texts = batch.pop("texts")
  ids, mask = tf.numpy_function(encode, [texts], [tf.int32, tf.bool], stateful=False)
  shape = tf.concat([tf.shape(texts), [text_len]], 0)
  batch["text_ids"] = tf.reshape(ids, shape)
  batch["text_mask"] = tf.reshape(mask, shape)
  return batch


def _finish(ds: tf.data.Dataset, config, batch_size: int, tokenizer_path: str):
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.map(functools.partial(_tokenize_batch, tokenizer_path=tokenizer_path,
                                text_len=int(config.data.text_len)),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  opts = tf.data.Options()
  opts.deterministic = True
  # One thread per op: tf.data's parallelism across examples is the efficient kind here.
  opts.threading.max_intra_op_parallelism = 1
  return ds.with_options(opts)


def _per_host(global_batch: int, process_count: int, what: str) -> int:
  if global_batch % process_count:
    raise ValueError(f"{what}={global_batch} is not divisible by the {process_count} hosts")
  return global_batch // process_count


def _process(process_index, process_count) -> tuple[int, int]:
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
  """

  def __init__(self, dataset: tf.data.Dataset, per_host_batch: int):
    self.dataset = dataset
    self.per_host_batch = per_host_batch
    self._iterator = dataset.as_numpy_iterator()
    self.num_examples = 0
    self.num_invalid = 0

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    self.num_examples += batch["valid"].size
    self.num_invalid += int(np.sum(~batch["valid"]))
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
  process_index, process_count = _process(process_index, process_count)
  batch_size = _per_host(int(config.batch_size), process_count, "batch_size")
  skip_corrupt = bool(config.data.skip_corrupt_files)
  files = host_files(list_files(records_pattern), process_index, process_count)
  _check_readable(files, skip_corrupt)
  o = _options(config)
  base = _train_key(config, process_index)

  start = int(start_step) * batch_size
  first_epoch, offset = 0, start
  if start:
    epoch_size = sum(_record_counts(files, skip_corrupt))
    if not epoch_size:
      raise ValueError(f"no records in {files}")
    first_epoch, offset = divmod(start, epoch_size)

  files_t = tf.constant(files)
  cycle = min(len(files), _MAX_CYCLE)
  shuffle_buffer = max(1, int(config.data.shuffle_buffer))

  def epoch_records(epoch):
    epoch_key = tf.random.experimental.stateless_fold_in(base, epoch)
    order = tf.argsort(tf.random.stateless_uniform([len(files)], epoch_key))
    ds = tf.data.Dataset.from_tensor_slices(tf.gather(files_t, order))
    ds = ds.interleave(functools.partial(_read_file, skip_corrupt=skip_corrupt),
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
    out = sample_example(records.parse(serialized), key, o)
    return {name: out[name] for name in _EXAMPLE_KEYS}

  ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
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
    its `valid_rate` / `num_invalid` count the examples emitted with valid=False.
  """
  ds, batch_size = make_train_dataset(config, records_pattern, tokenizer_path,
                                      start_step=start_step, process_index=process_index,
                                      process_count=process_count)
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
  process_index, process_count = _process(process_index, process_count)
  global_batch = int(config.data.eval_batch_size or config.batch_size)
  batch_size = _per_host(global_batch, process_count, "eval batch size")
  num_batches = int(config.data.eval_batches)
  skip_corrupt = bool(config.data.skip_corrupt_files)
  files = host_files(list_files(records_pattern), process_index, process_count)
  o = _options(config)
  base = tf.constant([int(config.seed) + int(seed_offset), _EVAL_TAG], tf.int64)

  ds = tf.data.Dataset.from_tensor_slices(files).interleave(
      functools.partial(_read_file, skip_corrupt=skip_corrupt),
      cycle_length=min(len(files), _MAX_CYCLE), block_length=1,
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.take(num_batches * batch_size)

  def example(serialized):
    ex = records.parse(serialized)
    key = tf.random.experimental.stateless_fold_in(
        base, tf.strings.to_hash_bucket_fast(ex["video_id"], np.iinfo(np.int64).max))
    out = sample_example(ex, key, o)
    return {name: out[name] for name in _EXAMPLE_KEYS}

  ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(_padding_example(o)).repeat())
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
    frames, image_size).
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
              cpu_seconds=cpu_seconds, valid_rate=it.valid_rate,
              frames=int(config.data.num_frames), image_size=int(config.data.image_size))


# ---------------------------------------------------------------------------------------------
# Labelled videos, TSN-style: the linear probe and video-to-video retrieval (tvts_jax/evaluate).

LABELLED_KEYS = ("video", "label", "valid")
_SPAN_FEATURES = ("duration", "label", "segment_labels", "segment_starts", "segment_ends")


def _labelled_spans(serialized: tf.Tensor):
  """(starts, ends, labels) of the labelled examples of one serialised record.

  A record with `label >= 0` is one example over [0, duration]; otherwise each segment with a
  label >= 0 is one example over [segment_start, segment_end]. Only these few features are
  parsed: counting examples never touches the frames.
  """
  ex = tf.io.parse_single_example(serialized, {k: records.FEATURES[k] for k in _SPAN_FEATURES})
  seg_labels = tf.cast(ex["segment_labels"], tf.int32)
  keep = seg_labels >= 0

  def whole():
    return (tf.zeros([1], tf.float32), tf.reshape(ex["duration"], [1]),
            tf.reshape(tf.cast(ex["label"], tf.int32), [1]))

  def segments():
    return (tf.boolean_mask(ex["segment_starts"], keep),
            tf.boolean_mask(ex["segment_ends"], keep), tf.boolean_mask(seg_labels, keep))

  return tf.cond(ex["label"] >= 0, whole, segments)


def _tsn_example(serialized: tf.Tensor, start: tf.Tensor, end: tf.Tensor, label: tf.Tensor,
                 o: dict[str, Any]) -> dict[str, tf.Tensor]:
  """T frames at the middles of T equal segments of [start, end], centre-cropped, uint8."""
  ex = records.parse(serialized)
  t, s = o["num_frames"], o["image_size"]
  centres = start + (tf.range(t, dtype=tf.float32) + 0.5) * ((end - start) / t)
  # The infinitely distant sentinel keeps argmin defined for a record without frames.
  frame_times = tf.concat([ex["frame_times"], [np.inf]], 0)
  index = tf.argmin(tf.abs(frame_times[None, :] - centres[:, None]), axis=1,
                    output_type=tf.int32)
  valid = tf.size(ex["frames"]) > 0
  native, size, _ = _crop_window(ex, tf.zeros([2], tf.int64), o)  # its random offset unused
  offset = (size - s) // 2
  video = tf.cond(valid,
                  lambda: _decode(tf.gather(ex["frames"], index), native, size, offset, o),
                  lambda: tf.zeros([t, s, s, 3], tf.uint8))
  return dict(video=tf.ensure_shape(video, [t, s, s, 3]), label=label, valid=valid)


def _read_all(files: Sequence[str], skip_corrupt: bool) -> tf.data.Dataset:
  """Every record of `files`, in order (the same order on every host)."""
  return tf.data.Dataset.from_tensor_slices(list(files)).flat_map(
      functools.partial(_read_file, skip_corrupt=skip_corrupt))


def count_labelled_examples(records_pattern, skip_corrupt: bool = True) -> int:
  """Number of labelled examples (see `make_labelled_iterator`) in a record set."""
  ds = _read_all(list_files(records_pattern), skip_corrupt)
  ds = ds.map(lambda s: tf.size(_labelled_spans(s)[2], out_type=tf.int64),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return int(ds.reduce(np.int64(0), lambda a, b: a + b))


def labelled_example_labels(records_pattern, skip_corrupt: bool = True,
                            max_examples: int = 0) -> np.ndarray:
  """int32 [N]: the label of each labelled example, in `make_labelled_iterator`'s order.

  Parses only the label fields: no frame is decoded.
  """
  ds = _read_all(list_files(records_pattern), skip_corrupt)
  ds = ds.flat_map(lambda s: tf.data.Dataset.from_tensor_slices(_labelled_spans(s)[2]))
  if max_examples:
    ds = ds.take(int(max_examples))
  return np.fromiter(ds.as_numpy_iterator(), np.int32)


class LabelledBatches(EvalBatches):
  """`EvalBatches` of labelled videos; `num_examples` counts the real (unpadded) ones."""

  def __init__(self, dataset: tf.data.Dataset, num_batches: int, per_host_batch: int,
               num_examples: int):
    super().__init__(dataset, num_batches, per_host_batch)
    self.num_examples = num_examples


def make_labelled_iterator(config: ml_collections.ConfigDict, records_pattern, *,
                           max_examples: int = 0, process_index: int | None = None,
                           process_count: int | None = None) -> LabelledBatches:
  """Padded per-host batches of labelled videos, TSN-style, for the probe and retrieval.

  Examples: a record with a class label (`label >= 0`, from `prepare --labels=...`) is one
  example over its whole duration; a record without one gives one example per segment with a
  label >= 0 (`segment_labels/starts/ends`, e.g. the demo's actions), over that segment.

  Every host reads the record files in the same (sorted) order and takes the examples whose
  index is its own modulo the number of hosts, so the hosts together see each example once and
  all run the same number of batches (the last ones padded with valid=False). A first pass
  counts the examples without decoding any frame.

  Args:
    config: reads data.{num_frames, image_size, resize_short, eval_batch_size,
      skip_corrupt_files} and batch_size.
    records_pattern: glob(s) of record shards.
    max_examples: use only the first this many examples (0: all).
    process_index: this host (default jax.process_index()).
    process_count: number of hosts (default jax.process_count()).

  Returns:
    `LabelledBatches` of dicts: video uint8 [B, T, S, S, 3] (T = data.num_frames frames, the
    stored frame nearest the middle of each of T equal segments of the example's span; the
    short side resized to resize_short and a centre S x S crop, S = image_size), label int32
    [B] (-1 on padding), valid bool [B]; B = global eval batch // process_count.

  Raises:
    ValueError: no labelled example in the records.
  """
  process_index, process_count = _process(process_index, process_count)
  global_batch = int(config.data.eval_batch_size or config.batch_size)
  batch_size = _per_host(global_batch, process_count, "eval batch size")
  skip_corrupt = bool(config.data.skip_corrupt_files)
  o = _options(config)
  total = count_labelled_examples(records_pattern, skip_corrupt)
  if max_examples:
    total = min(total, int(max_examples))
  if not total:
    raise ValueError(f"no labelled examples in {records_pattern!r}: records need label >= 0 "
                     "(prepare --labels=folders|csv) or labelled segments")
  per_host = -(-total // process_count)  # ceil: the first hosts get one more
  num_batches = -(-per_host // batch_size)

  def spans(serialized):
    starts, ends, labels = _labelled_spans(serialized)
    return tf.data.Dataset.from_tensor_slices((starts, ends, labels)).map(
        lambda a, b, c: (serialized, a, b, c))

  ds = _read_all(list_files(records_pattern), skip_corrupt).flat_map(spans)
  ds = ds.take(total).enumerate()
  ds = ds.filter(lambda i, _: i % process_count == process_index).map(lambda _, x: x)
  ds = ds.map(lambda *x: _tsn_example(*x, o), num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  t, s = o["num_frames"], o["image_size"]
  pad = dict(video=tf.zeros([t, s, s, 3], tf.uint8), label=tf.constant(-1, tf.int32),
             valid=tf.constant(False))
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
  ds = ds.take(num_batches * batch_size).batch(batch_size, drop_remainder=True)
  opts = tf.data.Options()
  opts.deterministic = True
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(opts)
  return LabelledBatches(ds, num_batches, batch_size, total)


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
