"""Labelled videos, TSN-style, for the probes and video-to-video retrieval (tvts_jax/evaluators).

A record with a class label (`label >= 0`, from `prepare --labels=...`) is one example over its
whole duration; a record without one gives one example per segment with a label >= 0
(`segment_labels/starts/ends`, e.g. the demo's actions), over that segment. Each example is read
as T frames at the middles of T equal segments of its span, the short side resized to
`data.resize_short` and a centre crop: the evaluation view of every frozen-encoder protocol.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import ml_collections
import numpy as np
import tensorflow as tf

from data_pipelines import records
from tvts_jax import sampling
from tvts_jax.input_pipeline import EvalBatches, list_files, process_of, read_file, split_batch


LABELLED_KEYS = ("video", "label", "valid", "caption")
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
  # The crop window's random offset is not used: the crop is centred.
  _, size, _ = sampling.crop_window(ex, tf.zeros([2], tf.int64), o)
  offset = (size - s) // 2
  video = sampling.decode_videos(ex["frames"], index[None], valid[None], offset[None],
                                 tf.stack([ex["height"], ex["width"]]), size, o)
  video = tf.reshape(video, [t, s, s, 3])
  return dict(video=tf.ensure_shape(video, [t, s, s, 3]), label=label, valid=valid,
              caption=ex["caption"])


def _read_all(files: Sequence[str], skip_corrupt: bool) -> tf.data.Dataset:
  """Every record of `files`, in order (the same order on every host)."""
  return tf.data.Dataset.from_tensor_slices(list(files)).flat_map(
      functools.partial(read_file, skip_corrupt=skip_corrupt))


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
    [B] (-1 on padding), valid bool [B], caption bytes [B] (the record's, "" if none);
    B = global eval batch // process_count.

  Raises:
    ValueError: no labelled example in the records.
  """
  process_index, process_count = process_of(process_index, process_count)
  global_batch = int(config.data.eval_batch_size or config.batch_size)
  batch_size = split_batch(global_batch, process_count, "eval batch size")
  skip_corrupt = bool(config.data.skip_corrupt_files)
  o = sampling.options(config)
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
             valid=tf.constant(False), caption=tf.constant(""))
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat())
  ds = ds.take(num_batches * batch_size).batch(batch_size, drop_remainder=True)
  opts = tf.data.Options()
  opts.deterministic = True
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(opts)
  return LabelledBatches(ds, num_batches, batch_size, total)
