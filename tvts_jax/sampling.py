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
with `fold_in(key, j)`, each with its own span, clips, frames, crop and order. A stored frame
that several of them use is decoded once, over the box holding the crops of every such frame's
users, and each example cuts its own crop out of it; a frame only one uses is decoded over its
crop alone.
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


def decode_frames(jpegs: tf.Tensor, native: tf.Tensor, size: tf.Tensor, offset: tf.Tensor,
                  o: dict[str, Any], stored: tf.Tensor | None = None) -> tf.Tensor:
  """Decodes and crops T frames (uint8 [T, S, S, 3]).

  `stored` ([h, w] of the stored frames) lets a frame at least twice the needed size be
  decoded at a DCT-domain scale (`scale_plan`); without it, frames not stored at resize_short
  (`native` False) are decoded whole and resized.
  """
  s, t = o["image_size"], o["num_frames"]
  branch, direct = (scale_plan(stored, size, o) if stored is not None
                    else (tf.constant(0, tf.int32), native))
  window = tf.stack([offset[0], offset[1], s, s])

  def fast():
    # Frames stored at resize_short, the common case. T is static: one decode op per frame
    # instead of a map_fn loop lets the executor run the decodes of one clip side by side and
    # saves the loop's bookkeeping.
    return tf.stack([tf.image.decode_and_crop_jpeg(jpegs[i], window, channels=3)
                     for i in range(t)])

  def other():  # scaled or resized: a loop, so the graph holds one copy of each decode path
    return tf.map_fn(lambda jpeg: _decode_window(jpeg, window, branch, direct, size), jpegs,
                     fn_output_signature=tf.TensorSpec([s, s, 3], tf.uint8))

  return tf.cond(tf.equal(branch, 0) & direct, fast, other)


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
  native, size, offset = crop_window(ex, keys[4], o)
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
      native=native,
      size=size,
      stored=tf.stack([ex["height"], ex["width"]]))


def _without_decode_inputs(d: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  return {k: v for k, v in d.items() if k not in ("native", "size", "stored")}


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
  video = tf.cond(
      d["valid"],
      lambda: decode_frames(tf.gather(ex["frames"], d["frame_index"]), d["native"], d["size"],
                            d["crop"], o, d["stored"]),
      lambda: tf.zeros([t, s, s, 3], tf.uint8))
  return dict(video=tf.ensure_shape(video, [t, s, s, 3]), **_without_decode_inputs(d))


def visit_key(key: tf.Tensor, j: int) -> tf.Tensor:
  """The key of example j of a visit: the visit's own key for j = 0, else fold_in(key, j)."""
  return key if j == 0 else tf.random.experimental.stateless_fold_in(key, j)


def decode_shared(jpegs: tf.Tensor, frame_index: tf.Tensor, valid: tf.Tensor,
                  offsets: tf.Tensor, stored: tf.Tensor, size: tf.Tensor,
                  o: dict[str, Any]) -> tf.Tensor:
  """The videos of n examples of one record, each stored frame decoded at most once.

  Args:
    jpegs: the record's frames.
    frame_index: int32 [n, T], the stored frame of each example's frame.
    valid: bool [n]; invalid examples decode nothing (a black video).
    offsets: int32 [n, 2], each example's crop offset (after resizing).
    stored: [2] the stored frames' size (`scale_plan`).
    size: [2] size after resizing.
    o: sampling options.

  Returns:
    uint8 [n, T, S, S, 3].
  """
  s, t = o["image_size"], o["num_frames"]
  n = int(frame_index.shape[0])
  slots = n * t
  idx = tf.reshape(frame_index, [slots])
  live = tf.repeat(valid, t)
  off = tf.repeat(offsets, t, axis=0)  # [slots, 2]
  # same[i, j]: slots i and j show the same stored frame (live slots only).
  same = (idx[:, None] == idx[None, :]) & live[:, None] & live[None, :]
  first = tf.argmax(tf.cast(same, tf.int32), axis=1, output_type=tf.int32)  # first user
  users = tf.reduce_sum(tf.cast(same, tf.int32), axis=1)
  shared = live & (users > 1)
  any_shared = tf.reduce_any(shared)
  branch, direct = scale_plan(stored, size, o)

  # A frame several slots show is decoded once, by its first user, over the box holding the
  # crops of every shared slot (one shape, so they stack); each user cuts its crop from the
  # stack. Frames one slot shows are decoded over that slot's crop alone.
  big = tf.int32.max
  box_lo = tf.where(any_shared, tf.reduce_min(tf.where(shared[:, None], off, big), 0), 0)
  box_hi = tf.where(any_shared, tf.reduce_max(tf.where(shared[:, None], off, -1), 0), 0)
  box = tf.concat([box_lo, box_hi - box_lo + s], 0)
  owners = shared & tf.equal(first, tf.range(slots))
  position = tf.cumsum(tf.cast(owners, tf.int32)) - 1  # of an owner slot in the stack
  native = tf.equal(branch, 0) & direct  # stored at resize_short: crops cut while decoding
  stack = tf.cond(  # (map_fn cannot stack zero images of an unknown shape)
      tf.reduce_any(owners),
      lambda: tf.map_fn(lambda i: _decode_window(jpegs[idx[i]], box, branch, direct, size),
                        tf.cast(tf.where(owners)[:, 0], tf.int32),
                        fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8)),
      lambda: tf.zeros([1, s, s, 3], tf.uint8))

  def cut(i):
    y, x = off[i, 0] - box_lo[0], off[i, 1] - box_lo[1]
    return stack[position[first[i]], y:y + s, x:x + s]

  def fast():
    # Frames stored at resize_short, the common case: as in `decode_frames`, one decode op
    # per slot (n and T are static), so the decodes of a visit run side by side.
    def example(j):
      window = tf.stack([offsets[j, 0], offsets[j, 1], s, s])
      frames = []
      for f in range(t):
        i = j * t + f
        frames.append(tf.cond(
            shared[i], functools.partial(cut, i),
            functools.partial(tf.image.decode_and_crop_jpeg, jpegs[idx[i]], window,
                              channels=3)))
      return tf.stack(frames)
    return tf.stack([tf.cond(valid[j], functools.partial(example, j),
                             lambda: tf.zeros([t, s, s, 3], tf.uint8)) for j in range(n)])

  def other():
    # Scaled or resized: one loop over the slots (rather than an op per slot), so the graph
    # holds one copy of each decode path, which keeps the pipeline quick to build.
    black = tf.zeros([s, s, 3], tf.uint8)

    def slot(i):
      window = tf.stack([off[i, 0], off[i, 1], s, s])
      return tf.cond(shared[i], lambda: cut(i), lambda: tf.cond(
          live[i], lambda: _decode_window(jpegs[idx[i]], window, branch, direct, size),
          lambda: black))
    crops = tf.map_fn(slot, tf.range(slots),
                      fn_output_signature=tf.TensorSpec([s, s, 3], tf.uint8))
    return tf.reshape(crops, [n, t, s, s, 3])

  return tf.cond(native, fast, other)


def sample_examples(ex: dict[str, tf.Tensor], key: tf.Tensor, o: dict[str, Any],
                    n: int) -> dict[str, tf.Tensor]:
  """n examples of one record (`data.samples_per_visit`), stacked on a leading axis.

  Example j is drawn with `visit_key(key, j)` exactly as `sample_example` draws one, so n=1
  is `sample_example` and example 0 of a visit is the example n=1 would give; the frames
  several examples use are decoded once (`decode_shared`).

  Returns:
    The dict of `sample_example`, every value with a leading axis of n.
  """
  if n == 1:
    return {k: v[None] for k, v in sample_example(ex, key, o).items()}
  draws = [_draw(ex, visit_key(key, j), o) for j in range(n)]
  stacked = {k: tf.stack([d[k] for d in draws]) for k in _without_decode_inputs(draws[0])}
  video = decode_shared(ex["frames"], stacked["frame_index"], stacked["valid"],
                        stacked["crop"], draws[0]["stored"], draws[0]["size"], o)
  t, s = o["num_frames"], o["image_size"]
  return dict(video=tf.ensure_shape(video, [n, t, s, s, 3]), **stacked)


def padding_example(o: dict[str, Any]) -> dict[str, tf.Tensor]:
  k, t, s = o["num_clips"], o["num_frames"], o["image_size"]
  return dict(video=tf.zeros([t, s, s, 3], tf.uint8), texts=tf.fill([k], ""),
              order=tf.range(k, dtype=tf.int32), valid=tf.constant(False),
              clip_labels=tf.fill([k], -1), label=tf.constant(-1))
