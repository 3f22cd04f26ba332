"""Converts videos and their transcripts into TFRecord shards of the `records` schema.

    # every video under DIR with a transcript of the same stem beside it (.json/.vtt/.srt)
    python -m data_pipelines.prepare --videos=DIR --output_dir=OUT --num_shards=64
    # the same through Apache Beam, locally on 8 processes, or on any runner
    python -m data_pipelines.prepare --videos=DIR --output_dir=OUT --num_shards=64 \
        --runner=DirectRunner --direct_num_workers=8
    # a labelled evaluation set (UCF101 layout DIR/CLASS/video.avi; no transcripts needed)
    python -m data_pipelines.prepare --videos=DIR --output_dir=OUT --num_shards=8 \
        --labels=folders --name=ucf101 --split=test

Per video: decode with PyAV, take the frame nearest each time k/fps, resize it so the short
side is `short_side`, JPEG-encode it; parse the transcript (`transcripts.py`); cut videos
longer than `window_seconds` into windows (records `stem@0`, `stem@1`, ...), each holding the
frames and the words that start inside it, times relative to the window start.

One pure function (`convert_video`) does that for both engines, shard assignment is a pure
function of the input listing, and records inside a shard are sorted by (video id, window),
so the local loop and any Beam runner write byte-identical shards for the same input.

A video that cannot be used is skipped with a reason code (`SKIP_REASONS`) and never stops
the run: the rest of its shard is written, `dataset_info.json` counts kept and skipped videos
by reason, and `skipped.jsonl` lists each skipped video with its reason and details.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import functools
import io
import itertools
import json
import multiprocessing
import os
import re
import uuid
from typing import Any, Iterable, Sequence

from absl import logging
import apache_beam as beam
import av
from PIL import Image
import tensorflow as tf
import tqdm

from data_pipelines import records
from data_pipelines import transcripts

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
LABEL_MODES = ("folders", "csv")
SKIPPED_FILE = "skipped.jsonl"
# Container metadata that is not UTF-8 (common in old AVI/MKV files) must not make a video
# unreadable. PyAV < 19 raises on it unless told `metadata_errors="ignore"`; PyAV 19 decodes it
# with surrogateescape and no longer takes the argument.
_AV_OPEN_KWARGS = ({"metadata_errors": "ignore"}
                   if int(av.__version__.split(".")[0]) < 19 else {})

# Reason code -> what was tried and what it means. Unexpected exceptions are counted as
# "error: <ExceptionType>" and logged with their traceback.
SKIP_REASONS = {
    "video_missing": "the video file does not exist",
    "video_empty": "the video file has zero bytes",
    "video_unreadable": "FFmpeg cannot open the file (corrupt, not a video, or no index, "
                        "e.g. an mp4 cut off before its moov atom)",
    "no_video_stream": "the file opens but has no video stream (audio only)",
    "video_decode_error": "more than `max_bad_packets` packets failed to decode, or "
                          "demuxing failed",
    "no_frames": "the video stream decodes to no frames",
    "video_truncated": "the frames end well before the duration in the header (a cut-off "
                       "download): missing more than max(1 s, 5%)",
    "too_short": "shorter than `min_duration` (default 15 s, the shortest TVTS span)",
    "transcript_missing": "no transcript beside the video (only when transcripts are "
                          "required)",
    "transcript_unreadable": "the transcript cannot be read or is not text",
    "transcript_empty": "the transcript holds no spoken words",
    "transcript_malformed": "the transcript cannot be parsed (bad JSON, timing lines, fields)",
    "transcript_unordered": "word times go back by more than `max_jitter` seconds",
    "transcript_past_end": "more than `max_past_end_fraction` of the words start after the "
                           "video ends (probably another video's transcript)",
    "no_label": "a labelled set, but the video has no class (not in a class folder, or an "
                "empty label cell)",
}


@dataclasses.dataclass(frozen=True)
class Options:
  """How one video is converted. Everything that changes the output bytes lives here.

  Attributes:
    fps: frames stored per second (the frame nearest each time k/fps).
    short_side: stored frames are resized so that their short side is this (up or down).
    window_seconds: longer videos are cut into windows of this length, rounded to whole
      frames at `fps`; a remainder shorter than `min_duration` joins the last window.
    min_duration: videos shorter than this are skipped (`too_short`).
    jpeg_quality: JPEG quality of the stored frames.
    require_transcripts: skip videos without a usable transcript. None: required unless the
      set is labelled (`prepare(labels=...)`). When not required, a transcript that fails to
      parse is dropped (counted in `transcripts_ignored`) and the video kept without words.
    max_jitter: seconds a word may be out of time order and still be sorted into place.
    max_past_end_fraction: skip when more than this fraction of the words start after the
      video ends; fewer such words are dropped and counted (`words_past_end`).
    max_bad_packets: undecodable packets tolerated per video (decoders conceal them).
  """
  fps: float = 2.0
  short_side: int = 268
  window_seconds: float = 300.0
  min_duration: float = 15.0
  jpeg_quality: int = 90
  require_transcripts: bool | None = None
  max_jitter: float = transcripts.DEFAULT_MAX_JITTER
  max_past_end_fraction: float = 0.5
  max_bad_packets: int = 5

  def __post_init__(self):
    if self.fps <= 0 or self.short_side < 1:
      raise ValueError(f"fps={self.fps} and short_side={self.short_side} must be positive")
    if self.min_duration < 0 or self.window_seconds < max(self.min_duration, 1 / self.fps):
      raise ValueError(f"window_seconds={self.window_seconds} must be at least "
                       f"min_duration={self.min_duration} (>= 0) and one frame")
    if not 1 <= self.jpeg_quality <= 100:
      raise ValueError(f"jpeg_quality={self.jpeg_quality} must be in [1, 100]")
    if self.max_jitter < 0 or not 0 <= self.max_past_end_fraction <= 1:
      raise ValueError("max_jitter must be >= 0 and max_past_end_fraction in [0, 1]")


@dataclasses.dataclass(frozen=True)
class VideoItem:
  """One input video, as listed before conversion.

  Attributes:
    video: path of the video file.
    transcript: path of its transcript, or None.
    video_id: id unique in the set (the stem; the relative path where stems collide).
    shard: output shard index.
    label: class index for labelled sets, -1 otherwise.
    skip: a skip reason already known when listing (e.g. `no_label`), or "".
  """
  video: str
  transcript: str | None
  video_id: str
  shard: int = 0
  label: int = -1
  skip: str = ""


@dataclasses.dataclass(frozen=True)
class Skip:
  """Why a video was not converted: `reason` is a `SKIP_REASONS` key or 'error: <type>'."""
  reason: str
  detail: str = ""


class _SkipVideo(Exception):
  """Raised inside the conversion to abandon one video; becomes a `Skip`."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}")
    self.skip = Skip(reason, detail)


# ------------------------------------------------------------------------------------------
# Decoding.

def _is_remote(path: str) -> bool:
  return "://" in path


def _file_size(path: str) -> int:
  try:
    return tf.io.gfile.stat(path).length if _is_remote(path) else os.path.getsize(path)
  except (OSError, tf.errors.NotFoundError):
    raise _SkipVideo("video_missing", path) from None


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
  """(width, height) scaled so that the shorter side is `short_side`, aspect kept."""
  if width <= height:
    return short_side, max(1, round(height * short_side / width))
  return max(1, round(width * short_side / height)), short_side


class _NearestFrameSampler:
  """Keeps, for each time k/fps, the JPEG of the decoded frame nearest to it.

  Frames arrive in presentation order; target k is settled as soon as a frame at or after it
  arrives, choosing between that frame and the one before (the earlier one on a tie). A
  source slower than `fps` gives repeated frames, so the stored rate is always `fps`.
  """

  def __init__(self, options: Options):
    self._fps = options.fps
    self._short_side = options.short_side
    self._quality = options.jpeg_quality
    self._prev = None  # (frame, time)
    self._last_encoded = (None, b"")
    self.size = None  # (width, height) of the stored frames
    self.jpegs: list[bytes] = []
    self.times: list[float] = []

  def add(self, frame: av.VideoFrame, time: float):
    while time >= len(self.times) / self._fps:
      target = len(self.times) / self._fps
      if self._prev is not None and target - self._prev[1] <= time - target:
        self._pick(*self._prev)
      else:
        self._pick(frame, time)
    self._prev = (frame, time)

  def finish(self, duration: float):
    """Targets after the last frame, but before the video's end, get the last frame."""
    while self._prev is not None and len(self.times) / self._fps < duration:
      self._pick(*self._prev)

  def _pick(self, frame, time):
    if self._last_encoded[0] is not frame:
      self._last_encoded = (frame, self._encode(frame))
    self.jpegs.append(self._last_encoded[1])
    self.times.append(time)

  def _encode(self, frame) -> bytes:
    if self.size is None:
      # Every frame gets the first frame's output size, so a record has one frame shape.
      self.size = output_size(frame.width, frame.height, self._short_side)
    width, height = self.size
    rgb = frame.reformat(width=width, height=height, format="rgb24",
                         interpolation="AREA").to_ndarray()
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=self._quality)
    return buf.getvalue()


@dataclasses.dataclass
class DecodedVideo:
  """Frames sampled from a whole video: jpegs[k] is the frame nearest time k / fps."""
  jpegs: list[bytes]
  times: list[float]
  duration: float
  width: int
  height: int


def decode_video(path: str, options: Options) -> DecodedVideo:
  """Decodes a video and samples its frames at `options.fps` (see `_NearestFrameSampler`).

  Args:
    path: local path or any tf.io.gfile path (gs://...).
    options: conversion options.

  Returns:
    The sampled frames as JPEG bytes with their presentation times (s from the stream start)
    and the duration (end of the last frame).

  Raises:
    _SkipVideo: the file is missing, empty, unreadable, truncated or has no video.
  """
  if _file_size(path) == 0:
    raise _SkipVideo("video_empty", "0 bytes")
  sampler = _NearestFrameSampler(options)
  with contextlib.ExitStack() as stack:
    try:
      source = stack.enter_context(tf.io.gfile.GFile(path, "rb")) if _is_remote(path) else path
      container = stack.enter_context(av.open(source, **_AV_OPEN_KWARGS))
    except av.error.FFmpegError as e:
      raise _SkipVideo("video_unreadable", str(e)) from None
    if not container.streams.video:
      kinds = sorted({s.type for s in container.streams})
      raise _SkipVideo("no_video_stream", f"streams: {kinds}")
    stream = container.streams.video[0]
    time_base = stream.time_base
    offset = float(stream.start_time * time_base) if stream.start_time is not None else 0.0
    rate = float(stream.average_rate or stream.guessed_rate or 0)
    if stream.duration:
      header_duration = float(stream.duration * time_base)
    else:
      header_duration = container.duration / av.time_base if container.duration else None
    bad_packets, last_time, last_length = 0, None, 0.0
    try:
      for packet in container.demux(stream):
        try:
          frames = packet.decode()
        except av.error.InvalidDataError as e:
          bad_packets += 1
          if bad_packets > options.max_bad_packets:
            raise _SkipVideo("video_decode_error",
                             f"{bad_packets} undecodable packets; last: {e}") from None
          continue
        for frame in frames:
          if frame.pts is not None:
            time = float(frame.pts * frame.time_base) - offset
          else:  # some AVI streams carry no pts; count frames at the nominal rate
            time = (last_time + 1 / rate) if (last_time is not None and rate) else 0.0
          if last_time is not None and time <= last_time:
            continue  # a repeated or backwards timestamp would break nearest-frame picking
          sampler.add(frame, time)
          last_time = time
          last_length = (float(frame.duration * frame.time_base) if frame.duration
                         else (1 / rate if rate else 0.0))
    except av.error.FFmpegError as e:
      raise _SkipVideo("video_decode_error", str(e)) from None
  if last_time is None:
    raise _SkipVideo("no_frames", f"{bad_packets} undecodable packets")
  duration = last_time + last_length
  if header_duration and duration < header_duration - max(1.0, 0.05 * header_duration):
    raise _SkipVideo("video_truncated",
                     f"frames end at {duration:.2f} s, header says {header_duration:.2f} s")
  sampler.finish(duration)
  width, height = sampler.size
  return DecodedVideo(sampler.jpegs, sampler.times, duration, width, height)


# ------------------------------------------------------------------------------------------
# One video -> records.

def window_bounds(duration: float, options: Options) -> list[tuple[int, float, float]]:
  """Splits a video into windows: [(first frame index, start s, end s)].

  Windows start on the frame grid (every round(window_seconds * fps) frames); a remainder
  shorter than `min_duration` joins the last window, so no window is too short to sample a
  TVTS span from.

  Args:
    duration: video length (s).
    options: conversion options.

  Returns:
    The windows in time order; one window for videos up to `window_seconds` long.
  """
  frames_per_window = max(1, round(options.window_seconds * options.fps))
  length = frames_per_window / options.fps
  full = int(duration // length)
  if full == 0:
    return [(0, 0.0, duration)]
  bounds = [(k * frames_per_window, k * length, (k + 1) * length) for k in range(full)]
  rest = duration - full * length
  if rest >= options.min_duration and rest > 0:
    bounds.append((full * frames_per_window, full * length, duration))
  else:
    first, start, _ = bounds[-1]
    bounds[-1] = (first, start, duration)
  return bounds


def _read_transcript(path: str | None, options: Options, stats: dict[str, Any]
                     ) -> list[transcripts.Word]:
  required = options.require_transcripts is not False
  if not path:
    if required:
      raise _SkipVideo("transcript_missing")
    return []
  try:
    return transcripts.parse_file(path, options.max_jitter)
  except transcripts.TranscriptError as e:
    if required:
      raise _SkipVideo(e.reason, e.detail) from None
    stats["transcript_ignored"] = e.reason
    return []


def _convert(video_path: str, transcript_path: str | None, options: Options, video_id: str,
             label: int) -> tuple[list[records.VideoRecord] | Skip, dict[str, Any]]:
  """`convert_video`, plus statistics for the summary."""
  stats = {"seconds": 0.0, "words": 0, "words_past_end": 0, "transcript_ignored": ""}
  try:
    # The transcript is cheap to check, the video is not: read the transcript first.
    words = _read_transcript(transcript_path, options, stats)
    video = decode_video(video_path, options)
    if video.duration < options.min_duration:
      raise _SkipVideo("too_short", f"{video.duration:.2f} s < {options.min_duration} s")
    past_end = sum(w.start >= video.duration for w in words)
    if words and past_end > options.max_past_end_fraction * len(words):
      # Most words later than the video: the transcript belongs to another video.
      if options.require_transcripts is not False:
        raise _SkipVideo("transcript_past_end", f"{past_end} of {len(words)} words start "
                         f"after the video ends at {video.duration:.2f} s")
      stats["transcript_ignored"] = "transcript_past_end"
      words, past_end = [], 0
    words = [w for w in words if w.start < video.duration]
  except _SkipVideo as e:
    return e.skip, stats
  stats.update(seconds=video.duration, words=len(words), words_past_end=past_end)
  windows = window_bounds(video.duration, options)
  out = []
  for k, (first, start, end) in enumerate(windows):
    last = windows[k + 1][0] if k + 1 < len(windows) else len(video.jpegs)
    length = end - start
    in_window = transcripts.window_words(words, start, end)
    out.append(records.VideoRecord(
        video_id=video_id if len(windows) == 1 else f"{video_id}@{k}",
        source=video_path,
        start_time=start,
        duration=length,
        fps=options.fps,
        height=video.height,
        width=video.width,
        frames=video.jpegs[first:last],
        # The nearest frame may sit up to half a source frame before the window start.
        frame_times=[min(max(t - start, 0.0), length) for t in video.times[first:last]],
        words=[w.text for w in in_window],
        word_starts=[w.start for w in in_window],
        word_ends=[w.end for w in in_window],
        label=label))
  return out, stats


def convert_video(video_path: str, transcript_path: str | None, options: Options = Options(),
                  *, video_id: str | None = None, label: int = -1
                  ) -> list[records.VideoRecord] | Skip:
  """Converts one video (and its transcript) into records, one per window.

  A pure function of its arguments and the files' bytes: both engines call it.

  Args:
    video_path: the video file (local or tf.io.gfile path).
    transcript_path: its transcript (.vtt, .srt, .json), or None.
    options: conversion options.
    video_id: id of the records (windows get `@k`); default the file's stem.
    label: class index for labelled sets.

  Returns:
    The records in time order, or a `Skip` saying why the video cannot be used. Unexpected
    errors (bugs) are raised, not turned into a `Skip`.
  """
  if video_id is None:
    video_id = os.path.splitext(os.path.basename(video_path))[0]
  return _convert(video_path, transcript_path, options, video_id, label)[0]


def process_item(item: VideoItem, options: Options
                 ) -> tuple[dict[str, Any], list[tuple[tuple[str, int], bytes]]]:
  """Converts one listed video; never raises for a bad video.

  Args:
    item: the listed video.
    options: conversion options.

  Returns:
    (outcome, records): outcome is a JSON-able dict for the summary (`reason` is "" when
    kept); records are ((video_id, window), serialised record) pairs in time order.
  """
  if item.skip:
    result, stats = Skip(item.skip), {}
  else:
    try:
      result, stats = _convert(item.video, item.transcript, options, item.video_id,
                               item.label)
    except Exception as e:  # pylint: disable=broad-except
      # One unforeseen failure must not end a run over millions of videos. It is logged
      # with its traceback and counted under its own reason, so it gets looked at.
      logging.exception("unexpected error converting %s", item.video)
      result, stats = Skip(f"error: {type(e).__name__}", str(e)[:500]), {}
  outcome = {
      "video": item.video, "video_id": item.video_id, "shard": item.shard,
      "reason": result.reason if isinstance(result, Skip) else "",
      "detail": result.detail if isinstance(result, Skip) else "",
      "records": 0 if isinstance(result, Skip) else len(result),
      "seconds": stats.get("seconds", 0.0), "words": stats.get("words", 0),
      "words_past_end": stats.get("words_past_end", 0),
      "transcript_ignored": stats.get("transcript_ignored", ""),
  }
  if isinstance(result, Skip):
    return outcome, []
  return outcome, [((item.video_id, k), records.serialize(r)) for k, r in enumerate(result)]


# ------------------------------------------------------------------------------------------
# Listing the inputs.

def _find_transcript(stem: str, files: set[str]) -> str | None:
  """The transcript beside a video: `stem.EXT`, else `stem.LANG.EXT` (yt-dlp), English first."""
  for ext in transcripts.EXTENSIONS:
    if stem + ext in files:
      return stem + ext
  tagged = re.compile(re.escape(stem) + r"\.([A-Za-z]{2,3}(?:[-_][A-Za-z0-9]+)*)(\.[a-z]+)$")
  found = []
  for name in files:
    m = tagged.match(name)
    if m and m.group(2) in transcripts.EXTENSIONS and m.group(1).lower() != "info":
      found.append((not m.group(1).lower().startswith("en"),
                    transcripts.EXTENSIONS.index(m.group(2)), name))
  return min(found)[2] if found else None


def _assign(items: list[VideoItem], num_shards: int, rel: dict[str, str]) -> list[VideoItem]:
  """Gives each item a unique id and a shard: round-robin over the items sorted by id.

  Round-robin over the sorted listing balances shards (labelled sets of a few hundred videos
  included) and depends on nothing but the listing, so every engine agrees.
  """
  stems = collections.Counter(it.video_id for it in items)
  items = [dataclasses.replace(it, video_id=os.path.splitext(rel[it.video])[0])
           if stems[it.video_id] > 1 else it for it in items]
  ids = collections.Counter(it.video_id for it in items)
  dupes = [i for i, n in ids.items() if n > 1]
  if dupes:
    raise ValueError(f"videos listed more than once: {dupes[:5]}")
  items.sort(key=lambda it: it.video_id)
  return [dataclasses.replace(it, shard=i % num_shards) for i, it in enumerate(items)]


def list_videos(videos_dir: str, num_shards: int, labels: str | None = None
                ) -> tuple[list[VideoItem], list[str] | None]:
  """Lists the videos under a directory (recursively) with the transcripts beside them.

  Args:
    videos_dir: local or tf.io.gfile directory.
    num_shards: number of output shards.
    labels: None, or "folders" for the DIR/CLASS/video layout (UCF101, HMDB51): the label
      is the index of the class folder's name in the sorted list of class folders.

  Returns:
    (items sorted by video id, each with its shard; class names, or None if unlabelled).
  """
  root = videos_dir.rstrip("/") or "/"
  if not tf.io.gfile.isdir(root):
    raise FileNotFoundError(f"no directory {videos_dir!r}")
  found = []  # (path, path relative to root, transcript path)
  for dirpath, _, filenames in tf.io.gfile.walk(root):
    files = set(filenames)
    subdir = dirpath.rstrip("/")[len(root):].lstrip("/")
    for name in files:
      stem, ext = os.path.splitext(name)
      if ext.lower() in VIDEO_EXTENSIONS:
        transcript = _find_transcript(stem, files)
        found.append((os.path.join(dirpath, name), os.path.join(subdir, name),
                      os.path.join(dirpath, transcript) if transcript else None))
  class_names = None
  if labels == "folders":
    class_names = sorted({rel.split("/")[0] for _, rel, _ in found if "/" in rel})
  elif labels:
    raise ValueError(f"labels={labels!r} needs a manifest; a directory takes 'folders'")
  index = {c: i for i, c in enumerate(class_names or ())}
  items, rel_of = [], {}
  for path, rel, transcript in found:
    label, skip = -1, ""
    if labels == "folders":
      if "/" in rel:
        label = index[rel.split("/")[0]]
      else:
        skip = "no_label"
    stem = os.path.splitext(os.path.basename(path))[0]
    items.append(VideoItem(path, transcript, stem, label=label, skip=skip))
    rel_of[path] = rel
  return _assign(items, num_shards, rel_of), class_names


def read_manifest(path: str, num_shards: int, labels: str | None = None
                  ) -> tuple[list[VideoItem], list[str] | None]:
  """Reads a CSV manifest with columns `video`, `transcript` (optional) and `label` (optional).

  Relative paths are relative to the manifest's directory; an empty transcript cell means
  none. With `labels="csv"` the label column gives the class: names are mapped to their
  index in the sorted list of names; if every label is a non-negative integer, that integer
  is the label (keeps an official class numbering, e.g. Something-Something v2).

  Args:
    path: the CSV file (local or tf.io.gfile).
    num_shards: number of output shards.
    labels: None, or "csv" to read the label column.

  Returns:
    (items sorted by video id, each with its shard; class names, or None).
  """
  with tf.io.gfile.GFile(path) as f:
    reader = csv.DictReader(f)
    columns = [c.strip() for c in reader.fieldnames or ()]
    rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
  if "video" not in columns:
    raise ValueError(f"{path}: no 'video' column (columns: {columns})")
  if labels == "csv" and "label" not in columns:
    raise ValueError(f"{path}: labels='csv' but no 'label' column")
  if labels not in (None, "csv"):
    raise ValueError(f"labels={labels!r} with a manifest; use 'csv'")
  base = os.path.dirname(path)

  def resolve(p):
    return p if (os.path.isabs(p) or _is_remote(p)) else os.path.join(base, p)

  class_names, index = None, {}
  if labels == "csv":
    names = sorted({r["label"] for r in rows if r.get("label")})
    if all(n.isdigit() for n in names):
      index = {n: int(n) for n in names}
    else:
      class_names = names
      index = {n: i for i, n in enumerate(names)}
  items, rel_of = [], {}
  for row in rows:
    if not row.get("video"):
      continue
    video = resolve(row["video"])
    label, skip = -1, ""
    if labels == "csv":
      label = index.get(row.get("label", ""), -1)
      skip = "" if label >= 0 else "no_label"
    transcript = resolve(row["transcript"]) if row.get("transcript") else None
    stem = os.path.splitext(os.path.basename(video))[0]
    items.append(VideoItem(video, transcript, stem, label=label, skip=skip))
    rel_of[video] = row["video"]
  return _assign(items, num_shards, rel_of), class_names


# ------------------------------------------------------------------------------------------
# Counting and writing.

class _Tally:
  """Counts over outcomes; mergeable, and exact whatever the order (Beam combines freely)."""

  def __init__(self):
    self.videos = self.kept = self.records = self.words = self.words_past_end = 0
    self.milliseconds = 0  # integer, so that sums do not depend on the order
    self.skipped = collections.Counter()
    self.transcripts_ignored = collections.Counter()

  def add(self, outcome: dict[str, Any]) -> _Tally:
    self.videos += 1
    if outcome["reason"]:
      self.skipped[outcome["reason"]] += 1
      return self
    self.kept += 1
    self.records += outcome["records"]
    self.milliseconds += round(outcome["seconds"] * 1000)
    self.words += outcome["words"]
    self.words_past_end += outcome["words_past_end"]
    if outcome["transcript_ignored"]:
      self.transcripts_ignored[outcome["transcript_ignored"]] += 1
    return self

  def merge(self, other: _Tally) -> _Tally:
    for key in ("videos", "kept", "records", "words", "words_past_end", "milliseconds"):
      setattr(self, key, getattr(self, key) + getattr(other, key))
    self.skipped.update(other.skipped)
    self.transcripts_ignored.update(other.transcripts_ignored)
    return self


class _TallyFn(beam.CombineFn):
  """`_Tally` as a Beam combiner."""

  def create_accumulator(self):
    return _Tally()

  def add_input(self, mutable_accumulator, element):
    return mutable_accumulator.add(element)

  def merge_accumulators(self, accumulators):
    accumulators = iter(accumulators)
    first = next(accumulators)
    for acc in accumulators:
      first.merge(acc)
    return first

  def extract_output(self, accumulator):
    return accumulator


def _summary(tally: _Tally, shard_counts: dict[int, int], meta: dict[str, Any]
             ) -> dict[str, Any]:
  n = meta["num_shards"]
  files = [records.shard_name(meta["name"], meta["split"], i, n) for i in range(n)]
  per_shard = [shard_counts.get(i, 0) for i in range(n)]
  if sum(per_shard) != tally.records:
    raise RuntimeError(f"wrote {sum(per_shard)} records but converted {tally.records}")
  return {
      **meta,
      "files": files,
      # File name -> records, the key the input pipeline reads to size and resume a stream.
      "shard_counts": dict(zip(files, per_shard)),
      "videos": tally.videos,
      "kept_videos": tally.kept,
      "skipped_videos": sum(tally.skipped.values()),
      "skipped": dict(sorted(tally.skipped.items())),
      "num_records": tally.records,
      "hours": round(tally.milliseconds / 3.6e6, 4),
      "words": tally.words,
      "words_past_end": tally.words_past_end,
      "transcripts_ignored": dict(sorted(tally.transcripts_ignored.items())),
  }


def _write_outputs(output_dir: str, info: dict[str, Any], skipped: Iterable[dict[str, Any]]):
  lines = [json.dumps({k: o[k] for k in ("video", "video_id", "reason", "detail")},
                      sort_keys=True)
           for o in sorted(skipped, key=lambda o: (o["video"], o["video_id"]))]
  with tf.io.gfile.GFile(os.path.join(output_dir, SKIPPED_FILE), "w") as f:
    f.write("".join(line + "\n" for line in lines))
  records.write_info(output_dir, info)


def _write_shard(output_dir: str, name: str, split: str, index: int, num_shards: int,
                 serialized: Iterable[bytes]) -> int:
  """Writes one shard through a temporary file, so a retried or killed writer leaves no
  half-written shard under the final name. Returns the number of records."""
  path = os.path.join(output_dir, records.shard_name(name, split, index, num_shards))
  tmp = f"{path}.tmp-{uuid.uuid4().hex}"
  count = 0
  with tf.io.TFRecordWriter(tmp) as writer:
    for record in serialized:
      writer.write(record)
      count += 1
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return count


# ------------------------------------------------------------------------------------------
# Engines.

def _run_local(items: Sequence[VideoItem], output_dir: str, meta: dict[str, Any],
               options: Options, workers: int) -> tuple[_Tally, dict[int, int], list[dict]]:
  """Converts in shard order (a process pool if workers > 1), streaming each shard out."""
  num_shards = meta["num_shards"]
  order = sorted(items, key=lambda it: (it.shard, it.video_id))
  per_shard = collections.Counter(it.shard for it in order)
  convert = functools.partial(process_item, options=options)
  tally, counts, skipped = _Tally(), {}, []
  with contextlib.ExitStack() as stack:
    if workers > 1:
      # spawn: the parent has TensorFlow loaded, which is not safe to fork.
      pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers))
      results = pool.imap(convert, order)  # ordered, so shards stream out in order
    else:
      results = map(convert, order)
    results = iter(results)
    bar = stack.enter_context(tqdm.tqdm(total=len(order), unit="video",
                                        desc=f"{meta['name']}-{meta['split']}"))

    def shard_records(count):
      for outcome, recs in itertools.islice(results, count):
        tally.add(outcome)
        if outcome["reason"]:
          skipped.append(outcome)
          bar.set_postfix(skipped=len(skipped), refresh=False)
        bar.update(1)
        for _, record in recs:
          yield record

    for s in range(num_shards):
      counts[s] = _write_shard(output_dir, meta["name"], meta["split"], s, num_shards,
                               shard_records(per_shard[s]))
  return tally, counts, skipped


_OUTCOMES = "outcomes"


class _ConvertFn(beam.DoFn):
  """Beam: item -> (shard, ((video_id, window), record bytes)), outcomes tagged aside."""

  def __init__(self, options: Options):
    super().__init__()
    self._options = options

  def process(self, item):
    outcome, recs = process_item(item, self._options)
    yield beam.pvalue.TaggedOutput(_OUTCOMES, outcome)
    for key, record in recs:
      yield item.shard, (key, record)


class _WriteShardFn(beam.DoFn):
  """Beam: (shard, [((video_id, window), record) or None]) -> writes it -> (shard, count)."""

  def __init__(self, output_dir: str, name: str, split: str, num_shards: int):
    super().__init__()
    self._args = (output_dir, name, split)
    self._num_shards = num_shards

  def process(self, element):
    shard, values = element
    # Sorting by (video_id, window) gives the order the local engine writes in.
    values = sorted((v for v in values if v is not None), key=lambda kv: kv[0])
    yield shard, _write_shard(*self._args, shard, self._num_shards,
                              (record for _, record in values))


def _write_beam_summary(unused, tally, counts, skipped, output_dir, meta):
  del unused
  _write_outputs(output_dir, _summary(tally, dict(counts), meta), skipped)


def _has_reason(outcome):
  return bool(outcome["reason"])


def _item_from_json(line: str) -> VideoItem:
  return VideoItem(**json.loads(line))


def _run_beam(items: Sequence[VideoItem], output_dir: str, meta: dict[str, Any],
              options: Options, runner: str, pipeline_args: Sequence[str]):
  """Runs the conversion as a Beam pipeline; the pipeline itself writes the summary."""
  from apache_beam.options import pipeline_options as po  # pylint: disable=g-import-not-at-top
  # The listing travels as a file, not inside the pipeline graph: runners cap the graph's size
  # (Dataflow at ~10 MB), far below a listing of millions of videos.
  items_path = os.path.join(output_dir, f".{meta['name']}-{meta['split']}-items.jsonl")
  with tf.io.gfile.GFile(items_path, "w") as f:
    f.write("".join(json.dumps(dataclasses.asdict(it)) + "\n" for it in items))
  opts = po.PipelineOptions(list(pipeline_args), runner=runner)
  direct = opts.view_as(po.DirectOptions)
  if direct.direct_num_workers != 1 and "--direct_running_mode" not in " ".join(pipeline_args):
    direct.direct_running_mode = "multi_processing"  # in_memory would run on one thread
  try:
    _build_and_run(opts, items_path, output_dir, meta, options)
  finally:
    tf.io.gfile.remove(items_path)


def _build_and_run(opts, items_path, output_dir, meta, options):
  num_shards, name, split = meta["num_shards"], meta["name"], meta["split"]
  with beam.Pipeline(options=opts) as p:
    converted = (
        p
        | "ReadItems" >> beam.io.ReadFromText(items_path)
        | "ParseItems" >> beam.Map(_item_from_json)
        | "Spread" >> beam.Reshuffle()  # one small file is one bundle; spread the work
        | "Convert" >> beam.ParDo(_ConvertFn(options))
        .with_output_types(tuple[int, Any])  # the tagged outcomes would confuse inference
        .with_outputs(_OUTCOMES, main="records"))
    # Every shard index enters the grouping, so empty shards are written too.
    shard_ids = p | "ShardIds" >> beam.Create([(s, None) for s in range(num_shards)])
    written = (
        (converted.records, shard_ids)
        | "AllShards" >> beam.Flatten()
        | "ByShard" >> beam.GroupByKey()
        | "WriteShards" >> beam.ParDo(_WriteShardFn(output_dir, name, split, num_shards)))
    outcomes = converted[_OUTCOMES]
    tally = outcomes | "Tally" >> beam.CombineGlobally(_TallyFn())
    skipped = (outcomes | "Skipped" >> beam.Filter(_has_reason)
               | "SkippedList" >> beam.combiners.ToList())
    counts = written | "ShardCounts" >> beam.combiners.ToList()
    _ = (p
         | "Once" >> beam.Create([None])
         | "WriteSummary" >> beam.Map(
             _write_beam_summary, tally=beam.pvalue.AsSingleton(tally),
             counts=beam.pvalue.AsSingleton(counts), skipped=beam.pvalue.AsSingleton(skipped),
             output_dir=output_dir, meta=meta))


def prepare(videos: str | None, output_dir: str, num_shards: int,
            options: Options = Options(), *, manifest: str | None = None,
            labels: str | None = None, name: str = "tvts", split: str = "train",
            runner: str = "local", workers: int = 1,
            pipeline_args: Sequence[str] = ()) -> dict[str, Any]:
  """Converts a set of videos into `num_shards` TFRecord shards plus a summary.

  Args:
    videos: directory of videos (recursive), transcripts beside them; or None with manifest.
    output_dir: where shards, `dataset_info.json` and `skipped.jsonl` go (local or gs://).
      One split per directory: the summary files are per directory.
    num_shards: number of shard files (all written, even if empty).
    options: conversion options.
    manifest: CSV with columns video, transcript[, label] instead of `videos`.
    labels: None, "folders" (class folders under `videos`) or "csv" (manifest's label).
    name: dataset name, the shard files' prefix.
    split: split name (train, test, ...).
    runner: "local" for the built-in loop, else a Beam runner name (DirectRunner, ...).
    workers: processes of the local loop.
    pipeline_args: extra Beam pipeline options (e.g. ["--direct_num_workers=8"]).

  Returns:
    The summary written to `dataset_info.json`.
  """
  if num_shards < 1:
    raise ValueError(f"num_shards={num_shards} must be >= 1")
  if (videos is None) == (manifest is None):
    raise ValueError("give exactly one of videos (a directory) and manifest (a CSV)")
  if labels not in (None, *LABEL_MODES):
    raise ValueError(f"labels={labels!r}; one of {LABEL_MODES} or None")
  if runner == "local" and pipeline_args:
    raise ValueError(f"pipeline options {list(pipeline_args)} need a Beam runner")
  if options.require_transcripts is None:
    options = dataclasses.replace(options, require_transcripts=labels is None)
  if manifest:
    items, class_names = read_manifest(manifest, num_shards, labels)
  else:
    items, class_names = list_videos(videos, num_shards, labels)
  tf.io.gfile.makedirs(output_dir)
  # Shards of an earlier run (maybe with another num_shards) would match the same glob.
  for stale in tf.io.gfile.glob(os.path.join(output_dir, f"{name}-{split}.tfrecord-*")):
    logging.warning("removing %s from an earlier run", stale)
    tf.io.gfile.remove(stale)
  meta = {
      "name": name, "split": split, "num_shards": num_shards,
      "engine": "local" if runner == "local" else f"beam:{runner}",
      "inputs": manifest or videos, "labels": labels or "",
      "options": dataclasses.asdict(options),
  }
  if class_names is not None:
    meta["class_names"] = class_names
  if not items:
    logging.warning("no videos (%s) in %s", ", ".join(VIDEO_EXTENSIONS), manifest or videos)
  logging.info("%d videos -> %d shards in %s (%s)", len(items), num_shards, output_dir,
               meta["engine"])
  if runner == "local":
    tally, counts, skipped = _run_local(items, output_dir, meta, options, workers)
    _write_outputs(output_dir, _summary(tally, counts, meta), skipped)
  else:
    _run_beam(items, output_dir, meta, options, runner, pipeline_args)
  return records.read_info(output_dir)


def format_summary(info: dict[str, Any]) -> str:
  """A printable table of a summary: kept, skipped by reason, records and shards."""
  rows = [("videos", info["videos"]),
          ("kept", f"{info['kept_videos']}  ({info['num_records']} records, "
                   f"{info['hours']:.2f} h, {info['words']} words)")]
  rows += [(f"skipped: {reason}", n) for reason, n in info["skipped"].items()]
  if info["words_past_end"]:
    rows.append(("words past the video end (dropped)", info["words_past_end"]))
  rows += [(f"transcript ignored: {r}", n) for r, n in info["transcripts_ignored"].items()]
  per = list(info["shard_counts"].values())
  rows.append(("shards", f"{len(per)} files, {min(per)}-{max(per)} records each"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


# ------------------------------------------------------------------------------------------
# Command line.

def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("videos", None, "directory of videos (searched recursively), each with "
                      "a transcript of the same stem beside it (.json, .vtt, .srt)")
  flags.DEFINE_string("manifest", None, "CSV with columns video,transcript[,label] "
                      "(paths relative to the CSV) instead of --videos")
  flags.DEFINE_string("output_dir", None, "output directory (local or gs://)", required=True)
  flags.DEFINE_integer("num_shards", None, "number of shard files", required=True)
  flags.DEFINE_string("name", "tvts", "dataset name, the shard files' prefix")
  flags.DEFINE_string("split", "train", "split name")
  flags.DEFINE_float("fps", Options.fps, "frames stored per second")
  flags.DEFINE_integer("short_side", Options.short_side, "stored frames' short side (px)")
  flags.DEFINE_float("window_seconds", Options.window_seconds,
                     "longer videos are cut into windows of this length")
  flags.DEFINE_float("min_duration", Options.min_duration, "skip videos shorter than this")
  flags.DEFINE_integer("jpeg_quality", Options.jpeg_quality, "JPEG quality")
  flags.DEFINE_float("max_jitter", Options.max_jitter,
                     "seconds a word may be out of order and still be sorted into place")
  flags.DEFINE_enum("labels", None, list(LABEL_MODES),
                    "labelled set: 'folders' (DIR/CLASS/video) or 'csv' (manifest column)")
  flags.DEFINE_boolean("require_transcripts", None,
                       "skip videos without a usable transcript (default: true, but false "
                       "with --labels)")
  flags.DEFINE_string("runner", "local", "'local' (built-in loop) or a Beam runner: "
                      "DirectRunner, DataflowRunner, ...; other flags go to Beam")
  flags.DEFINE_integer("workers", 0, "processes of the local runner (0: all CPUs)")


def _main(argv):
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  f = flags.FLAGS
  if f.runner == "local" and argv[1:]:
    raise app.UsageError(f"unknown flags {argv[1:]}; pipeline options need a Beam --runner")
  tf.config.set_visible_devices([], "GPU")  # the converter never needs one
  options = Options(fps=f.fps, short_side=f.short_side, window_seconds=f.window_seconds,
                    min_duration=f.min_duration, jpeg_quality=f.jpeg_quality,
                    require_transcripts=f.require_transcripts, max_jitter=f.max_jitter)
  info = prepare(f.videos, f.output_dir, f.num_shards, options, manifest=f.manifest,
                 labels=f.labels, name=f.name, split=f.split, runner=f.runner,
                 workers=f.workers or os.cpu_count() or 1, pipeline_args=argv[1:])
  print(f"{f.output_dir}:\n{format_summary(info)}")


def _parse_flags(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  # Flags this module does not define are Beam pipeline options (--project, --region, ...).
  return flags.FLAGS(argv, known_only=True)


def cli():
  """Entry point of `python -m data_pipelines.prepare`."""
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(_main, flags_parser=_parse_flags)


if __name__ == "__main__":
  # Run through the importable module, so that Beam and process pools pickle its functions
  # as `data_pipelines.prepare.*` rather than as `__main__.*`.
  from data_pipelines import prepare as _prepare  # pylint: disable=g-import-not-at-top
  _prepare.cli()
