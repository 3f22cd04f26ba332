"""One TVTS example from one parsed record: span, clips, transcripts, frames, crop.

`sample_example(record, key, options)` is a pure function of the record and a stateless seed,
so the training and evaluation streams (`input_pipeline`) reproduce any example from (seed,
host, epoch, position) alone.

- Clip length L drawn uniformly from `clip_seconds` among the lengths whose span
  `K * L + (K - 1) * gap_seconds` fits in the video; span start uniform in
  [0, duration - span] (a continuous start: the reference's whole-second start plus sub-second
  jitter, kept inside the video). Clip i covers [start + i (L + gap), ... + L).
- A video shorter than every such span is shortened as the reference does: the span
  [0, duration - 1] is cut into K clips with the same gaps, L = (duration - 1 - (K - 1) gap) / K
  (`shortened` is True; invalid if L <= 0). A record shorter than `min_video_seconds` is invalid.
- Transcript i: the words whose START time lies in clip i, joined by spaces.
- Up to `span_tries` spans are drawn; the first whose every clip has >= `min_words_per_clip`
  words is used. If none has (or no length fits), the example is emitted with valid=False and
  a black video, so the stream stays one example per record visit.
- Frames: the span is cut into T equal segments; one uniform random time per segment; the
  stored frame nearest to it (chronological). Only those T JPEGs are decoded.
- One random image_size^2 crop shared by all frames. Frames stored with short side ==
  resize_short are decoded with `decode_and_crop_jpeg` (only the crop is decoded). Frames
  stored at least twice as large are decoded at JPEG's DCT-domain scale 1/2, 1/4 or 1/8 (the
  largest that keeps the short side >= resize_short; `data.dct_downscale`), and cropped while
  decoding when that scale gives resize_short (within one pixel of rounding); others are
  decoded, resized to short side resize_short (bilinear, antialiased) and cropped. No flip.
- The transcripts are shuffled by a random permutation `order`.

`sample_examples(record, key, options, n)` draws n such examples from one parsed record
(`data.samples_per_visit`): example 0 with `key` itself (so n=1 is `sample_example`), example j
with `fold_in(key, j)`, each with its own span, clips, frames, crop and order. Each example
decodes its own frames, also a stored frame another example of the visit uses: decoding such a
frame once for both (over the box of both crops) measured slower than decoding it twice, so the
visit only saves reading and parsing the record (docs/performance.md).
"""

from __future__ import annotations

import functools
from typing import Any

import ml_collections
import numpy as np
import tensorflow as tf



def options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  d = config.data
  return dict(num_clips=int(d.num_clips), num_frames=int(d.num_frames),
              samples_per_visit=int(d.get("samples_per_visit", 1)),
              dct_downscale=bool(d.get("dct_downscale", True)),
              image_size=int(d.image_size), resize_short=int(d.resize_short),
              clip_seconds=tuple(float(s) for s in d.clip_seconds),
              gap_seconds=float(d.gap_seconds), span_tries=max(1, int(d.span_tries)),
              min_words=int(d.min_words_per_clip), min_seconds=float(d.min_video_seconds))


def _first_true(x: tf.Tensor) -> tf.Tensor:
  """Index of the first True of a bool vector (its length if none)."""
  n = tf.size(x)
  return tf.reduce_min(tf.where(x, tf.range(n), n))


def _choose_span(ex: dict[str, tf.Tensor], keys: tf.Tensor, o: dict[str, Any]):
  """Draws `span_tries` spans at once and keeps the first whose every clip has enough words.

  A video shorter than every span gets the reference's fallback: the span [0, duration - 1]
  cut into K clips with the same gaps (the same for every try).

  Returns:
    (valid, clip_starts [K], clip_len, inside [K, num_words] word-in-clip mask, shortened).
  """
  k, tries = o["num_clips"], o["span_tries"]
  duration = ex["duration"]
  choices = tf.constant(o["clip_seconds"], tf.float32)
  fits = k * choices + (k - 1) * o["gap_seconds"] <= duration
  num_fit = tf.reduce_sum(tf.cast(fits, tf.int32))
  shortened = num_fit == 0
  # Where no length fits, the only candidate is the fallback's length (<= 0 for a video too
  # short for K clips and their gaps: invalid).
  short_len = (duration - 1.0 - (k - 1) * o["gap_seconds"]) / k
  fitting = tf.concat([tf.boolean_mask(choices, fits), tf.reshape(short_len, [1])], 0)
  pick = tf.random.stateless_uniform([tries], keys[0])
  pick = tf.minimum(tf.cast(pick * tf.cast(tf.maximum(num_fit, 1), tf.float32), tf.int32),
                    tf.maximum(num_fit, 1) - 1)
  clip_len = tf.gather(fitting, pick)  # [tries]
  span = k * clip_len + (k - 1) * o["gap_seconds"]
  start = tf.random.stateless_uniform([tries], keys[1]) * tf.maximum(duration - span, 0.0)
  start = tf.where(shortened, 0.0, start)  # the fallback span starts the video
  clip_starts = start[:, None] + tf.range(k, dtype=tf.float32)[None] * (
      clip_len + o["gap_seconds"])[:, None]  # [tries, K]
  clip_ends = clip_starts + clip_len[:, None]
  word_times = ex["word_starts"]
  inside = ((word_times[None, None, :] >= clip_starts[..., None]) &
            (word_times[None, None, :] < clip_ends[..., None]))  # [tries, K, words]
  counts = tf.reduce_sum(tf.cast(inside, tf.int32), -1)
  ok = (tf.reduce_all(counts >= o["min_words"], -1) & (clip_len > 0) &
        (duration >= o["min_seconds"]))
  chosen = tf.minimum(_first_true(ok), tries - 1)
  return (tf.reduce_any(ok), clip_starts[chosen], clip_len[chosen], inside[chosen],
          shortened)


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


def crop_window(ex: dict[str, tf.Tensor], key: tf.Tensor, o: dict[str, Any]):
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


# JPEG's DCT-domain scales: libjpeg decodes at 1/r of the size for these r, cheaper than
# decoding the whole frame and resizing it.
RATIOS = (1, 2, 4, 8)


def scale_plan(stored: tf.Tensor, size: tf.Tensor, o: dict[str, Any]):
  """How to decode frames of size `stored` [h, w] that are resized to `size` [h, w].

  Returns:
    (branch, direct): decode at scale 1 / RATIOS[branch], the largest that leaves both sides
    at least `size` (1 without `dct_downscale`); direct: the frame decoded at that scale is
    `size`, or one pixel more on a side (rounding), so the crop is cut while decoding without
    a resize (at scale 1: the frames are stored at resize_short).
  """
  h, w = tf.cast(stored[0], tf.int32), tf.cast(stored[1], tf.int32)
  branch = tf.constant(0, tf.int32)
  if o.get("dct_downscale", True):
    for i, r in enumerate(RATIOS[1:], 1):
      fits = ((h + r - 1) // r >= size[0]) & ((w + r - 1) // r >= size[1])
      branch = tf.where(fits, i, branch)
  r = tf.gather(tf.constant(RATIOS, tf.int32), branch)
  sh, sw = (h + r - 1) // r, (w + r - 1) // r
  slack = tf.where(r > 1, 1, 0)
  direct = ((sh >= size[0]) & (sw >= size[1]) & (sh - size[0] <= slack) &
            (sw - size[1] <= slack))
  return branch, direct


def _decode_window(jpeg: tf.Tensor, window: tf.Tensor, branch: tf.Tensor, direct: tf.Tensor,
                   size: tf.Tensor) -> tf.Tensor:
  """Pixels window = [y, x, h, w] of a frame resized to `size`, decoded as `scale_plan` says."""
  def at(r):
    def crop():  # only the window is decoded (libjpeg's cropped, scaled decode)
      return tf.image.decode_and_crop_jpeg(jpeg, window, channels=3, ratio=r)

    def resize():
      image = tf.image.decode_jpeg(jpeg, channels=3, ratio=r)
      image = tf.image.resize(image, size, method="bilinear", antialias=True)
      image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
      return image[window[0]:window[0] + window[2], window[1]:window[1] + window[3]]
    return lambda: tf.cond(direct, crop, resize)
  return tf.switch_case(branch, [at(r) for r in RATIOS])


def decode_videos(frames: tf.Tensor, frame_index: tf.Tensor, valid: tf.Tensor,
                  offsets: tf.Tensor, stored: tf.Tensor, size: tf.Tensor,
                  o: dict[str, Any]) -> tf.Tensor:
  """The videos of n examples of one record: each frame decoded and cropped (uint8).

  Args:
    frames: the record's JPEG frames (possibly none: then every example must be invalid).
    frame_index: int32 [n, T], the stored frame of each example's frame.
    valid: bool [n]; an invalid example's video is black.
    offsets: int32 [n, 2], each example's crop offset in the frame resized to `size`.
    stored: [2] the stored frames' size ([h, w]), for `scale_plan`.
    size: [2] the size after resizing to short side resize_short.
    o: sampling options.

  Returns:
    uint8 [n, T, S, S, 3].
  """
  s, t = o["image_size"], o["num_frames"]
  n = int(frame_index.shape[0])
  branch, direct = scale_plan(stored, size, o)
  black = tf.zeros([s, s, 3], tf.uint8)

  def native():
    # Frames stored at resize_short, the common case: one op per frame of the visit (n and T
    # are static), so the decodes run side by side, each cutting its crop while decoding; the
    # visit's frames are stacked once (stacking each example, then the visit, copies every
    # frame twice: measured slower).
    def crops(j):
      jpegs = tf.gather(frames, frame_index[j])
      window = tf.stack([offsets[j, 0], offsets[j, 1], s, s])
      return [tf.image.decode_and_crop_jpeg(jpegs[f], window, channels=3) for f in range(t)]
    out = []
    for j in range(n):  # an invalid example (maybe of a record without frames) decodes nothing
      out += tf.cond(valid[j], functools.partial(crops, j), lambda: [black] * t)
    return tf.stack(out)

  def scaled():
    # Decoded at a DCT scale and/or resized: one loop over the frames of the visit (rather
    # than an op per frame), so the graph holds one copy of each decode path and stays quick
    # to build.
    index = tf.reshape(frame_index, [n * t])
    live = tf.repeat(valid, t)
    off = tf.repeat(offsets, t, axis=0)

    def slot(i):
      window = tf.stack([off[i, 0], off[i, 1], s, s])
      return tf.cond(live[i], lambda: _decode_window(frames[index[i]], window, branch, direct,
                                                     size), lambda: black)
    return tf.map_fn(slot, tf.range(n * t),
                     fn_output_signature=tf.TensorSpec([s, s, 3], tf.uint8))

  video = tf.cond(tf.equal(branch, 0) & direct, native, scaled)
  return tf.reshape(video, [n, t, s, s, 3])


def _draw(ex: dict[str, tf.Tensor], key: tf.Tensor, o: dict[str, Any]) -> dict[str, tf.Tensor]:
  """Every random choice of one example but the decoding: span, clips, order, frames, crop."""
  k, t = o["num_clips"], o["num_frames"]
  keys = tf.random.experimental.stateless_split(key, num=5)
  valid, clip_starts, clip_len, inside, shortened = _choose_span(ex, keys[:2], o)
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
  _, size, offset = crop_window(ex, keys[4], o)
  return dict(
      texts=tf.gather(clip_texts, order),
      order=order,
      valid=valid,
      clip_labels=_clip_labels(ex, clip_starts, clip_len),
      label=tf.cast(ex["label"], tf.int32),
      shortened=shortened,
      clip_texts=clip_texts,
      span_start=span_start,
      clip_len=clip_len,
      clip_starts=clip_starts,
      frame_index=frame_index,
      crop=offset,
      size=size,
      stored=tf.stack([ex["height"], ex["width"]]))


def _without_decode_inputs(d: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  return {k: v for k, v in d.items() if k not in ("size", "stored")}


def sample_example(ex: dict[str, tf.Tensor], key: tf.Tensor,
                   o: dict[str, Any]) -> dict[str, tf.Tensor]:
  """Samples one example from a parsed record with a stateless key.

  Args:
    ex: a record parsed by `records.parse`.
    key: int64 [2] stateless seed.
    o: sampling options (`options(config)`).

  Returns:
    dict with `video`, `texts` (string [K], shuffled), `order`, `valid`, `clip_labels`,
    `label`, `shortened` (the span was shortened to fit a short video), and for inspection
    `clip_texts` (string [K], in time order), `span_start`,
    `clip_len`, `clip_starts` [K], `frame_index` [T] and `crop` [2] (y, x offset after resize).
  """
  t, s = o["num_frames"], o["image_size"]
  d = _draw(ex, key, o)
  # Decoded under one conditional on validity (rather than decode_videos' own per example):
  # measured a few percent faster per CPU-second for a single example.
  video = tf.cond(
      d["valid"],
      lambda: tf.reshape(decode_videos(ex["frames"], d["frame_index"][None],
                                       tf.constant([True]), d["crop"][None], d["stored"],
                                       d["size"], o), [t, s, s, 3]),
      lambda: tf.zeros([t, s, s, 3], tf.uint8))
  return dict(video=tf.ensure_shape(video, [t, s, s, 3]), **_without_decode_inputs(d))


def visit_key(key: tf.Tensor, j: int) -> tf.Tensor:
  """The key of example j of a visit: the visit's own key for j = 0, else fold_in(key, j)."""
  return key if j == 0 else tf.random.experimental.stateless_fold_in(key, j)


def sample_examples(ex: dict[str, tf.Tensor], key: tf.Tensor, o: dict[str, Any],
                    n: int) -> dict[str, tf.Tensor]:
  """n examples of one record (`data.samples_per_visit`), stacked on a leading axis.

  Example j is drawn with `visit_key(key, j)` exactly as `sample_example` draws one, so n=1
  is `sample_example` and example 0 of a visit is the example n=1 would give; their frames are
  decoded by one `decode_videos`.

  Returns:
    The dict of `sample_example`, every value with a leading axis of n.
  """
  if n == 1:
    return {k: v[None] for k, v in sample_example(ex, key, o).items()}
  draws = [_draw(ex, visit_key(key, j), o) for j in range(n)]
  stacked = {k: tf.stack([d[k] for d in draws]) for k in _without_decode_inputs(draws[0])}
  video = decode_videos(ex["frames"], stacked["frame_index"], stacked["valid"],
                        stacked["crop"], draws[0]["stored"], draws[0]["size"], o)
  t, s = o["num_frames"], o["image_size"]
  return dict(video=tf.ensure_shape(video, [n, t, s, s, 3]), **stacked)


def padding_example(o: dict[str, Any]) -> dict[str, tf.Tensor]:
  k, t, s = o["num_clips"], o["num_frames"], o["image_size"]
  return dict(video=tf.zeros([t, s, s, 3], tf.uint8), texts=tf.fill([k], ""),
              order=tf.range(k, dtype=tf.int32), valid=tf.constant(False),
              clip_labels=tf.fill([k], -1), label=tf.constant(-1))
