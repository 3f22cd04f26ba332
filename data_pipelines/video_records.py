"""One video and its transcript -> records: the conversion both engines share.

Per video: decode and sample its frames (`decode.py`); parse the transcript
(`transcripts.py`), or with `Options.asr` recognise the speech of a video without one
(`asr`); cut videos longer than `window_seconds` into windows (records `stem@0`,
`stem@1`, ...), each holding the frames and the words that start inside it, times relative to
the window start.

`convert_video` is a pure function of its arguments and the files' bytes, and `Options` holds
everything that changes the output bytes, so every engine and worker count writes the same
records. A video that cannot be used becomes a `Skip` with a reason code (`SKIP_REASONS`);
`process_item` never raises for a bad video, so one video never stops a run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from absl import logging

from data_pipelines import asr
from data_pipelines import decode
from data_pipelines import records
from data_pipelines import transcripts

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
    "too_short": "shorter than `min_duration` (default 6 s, the shortest video that holds "
                 "K = 4 clips)",
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
    # With --asr, for a video without a transcript beside it:
    **{reason: f"(--asr) {meaning}" for reason, meaning in asr.REASONS.items()},
}


@dataclasses.dataclass(frozen=True)
class Options:
  """How one video is converted. Everything that changes the output bytes lives here.

  Attributes:
    fps: frames stored per second (the frame nearest each time k/fps).
    short_side: stored frames are resized so that their short side is this (up or down).
    window_seconds: longer videos are cut into windows of this length, rounded to whole
      frames at `fps`; a remainder shorter than `min_duration` joins the last window.
    min_duration: videos shorter than this are skipped (`too_short`). Conversion outlives any
      one config, so this is the shortest video that can hold K clips at all, not the config's
      span: the input pipeline shortens the span of a video shorter than it to
      [0, duration - 1] cut into K clips with the same gaps (as the reference does), i.e. clips
      of (duration - 1 - 3 gap) / 4 s with the reference's K = 4 and 1-s gaps. From 6 s on
      each clip is at least 0.5 s long, one stored frame at the default 2 fps and about one
      spoken word; shorter videos cannot give four clips with words in each. A config that
      wants longer videos sets `data.min_video_seconds` (applied when reading).
    jpeg_quality: JPEG quality of the stored frames.
    require_transcripts: skip videos without a usable transcript. None: required unless the
      set is labelled (`prepare(labels=...)`). When not required, a transcript that fails to
      parse is dropped (counted in `transcripts_ignored`) and the video kept without words.
    max_jitter: seconds a word may be out of time order and still be sorted into place.
    max_past_end_fraction: skip when more than this fraction of the words start after the
      video ends; fewer such words are dropped and counted (`words_past_end`).
    max_bad_packets: undecodable packets tolerated per video (decoders conceal them).
    asr: `BACKEND:MODEL_DIR` (`asr.BACKENDS`): transcribe the videos that have no transcript
      beside them with our speech recognition; "" (default): never.
    asr_language: with `asr`, the language wanted (`asr.load`); "": any.
    asr_device: with `asr`, where its model runs: `cpu` or `cuda`.
  """
  fps: float = 2.0
  short_side: int = 268
  window_seconds: float = 300.0
  min_duration: float = 6.0
  jpeg_quality: int = 90
  require_transcripts: bool | None = None
  max_jitter: float = transcripts.DEFAULT_MAX_JITTER
  max_past_end_fraction: float = 0.5
  max_bad_packets: int = 5
  asr: str = ""
  asr_language: str = ""
  asr_device: str = "cpu"

  def __post_init__(self):
    if self.asr:
      asr.parse_spec(self.asr)
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
    caption: a caption of the whole video (a manifest's `caption` column), or "".
  """
  video: str
  transcript: str | None
  video_id: str
  shard: int = 0
  label: int = -1
  skip: str = ""
  caption: str = ""


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


def asr_backend(options: Options) -> asr.Backend:
  """The speech recogniser of `options.asr`, loaded once per process."""
  backend, model = asr.parse_spec(options.asr)
  return asr.cached(backend, model, options.asr_language or None, options.asr_device)


def _read_transcript(path: str | None, options: Options, stats: dict[str, Any]
                     ) -> tuple[list[transcripts.Word], str]:
  """(words, which ASR made them or "") of the transcript beside a video."""
  required = options.require_transcripts is not False
  if not path:
    if required and not options.asr:
      raise _SkipVideo("transcript_missing")
    return [], ""
  try:
    return transcripts.read_transcript(path, options.max_jitter)
  except transcripts.TranscriptError as e:
    if required:
      raise _SkipVideo(e.reason, e.detail) from None
    stats["transcript_ignored"] = e.reason
    return [], ""


def _recognise(video_path: str, options: Options, stats: dict[str, Any]
               ) -> tuple[list[transcripts.Word], str]:
  """(words, BACKEND:MODEL) from our speech recognition, through the same Whisper JSON that
  `transcribe` writes, so that inline and two-step conversions store the same words."""
  backend = asr_backend(options)
  try:
    transcript = asr.transcribe_file(video_path, backend, options.max_bad_packets)
  except asr.AsrError as e:
    if options.require_transcripts is not False:
      raise _SkipVideo(e.reason, e.detail) from None
    stats["transcript_ignored"] = e.reason
    return [], ""
  text = json.dumps(asr.whisper_json(transcript, backend))
  return transcripts.parse_string(text, "whisper", options.max_jitter), asr.identity(backend)


def _convert(video_path: str, transcript_path: str | None, options: Options, video_id: str,
             label: int, caption: str = ""
             ) -> tuple[list[records.VideoRecord] | Skip, dict[str, Any]]:
  """`convert_video`, plus statistics for the summary."""
  stats = {"seconds": 0.0, "words": 0, "words_past_end": 0, "transcript_ignored": "",
           "asr": ""}
  try:
    # The transcript is cheap to check, the video is not: read the transcript first.
    words, made_by = _read_transcript(transcript_path, options, stats)
    video = decode.decode_video(video_path, options)
    if video.duration < options.min_duration:
      raise _SkipVideo("too_short", f"{video.duration:.2f} s < {options.min_duration} s")
    if not transcript_path and options.asr:
      # After the video: a video that cannot be used costs no speech recognition.
      words, made_by = _recognise(video_path, options, stats)
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
  except decode.VideoError as e:
    return Skip(e.reason, e.detail), stats
  stats.update(seconds=video.duration, words=len(words), words_past_end=past_end,
               asr=made_by if words else "")
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
        label=label,
        transcript_asr=stats["asr"],
        caption=caption))
  return out, stats


def convert_video(video_path: str, transcript_path: str | None, options: Options = Options(),
                  *, video_id: str | None = None, label: int = -1, caption: str = ""
                  ) -> list[records.VideoRecord] | Skip:
  """Converts one video (and its transcript) into records, one per window.

  A pure function of its arguments and the files' bytes: both engines call it.

  Args:
    video_path: the video file (local or tf.io.gfile path).
    transcript_path: its transcript (.vtt, .srt, .json), or None.
    options: conversion options.
    video_id: id of the records (windows get `@k`); default the file's stem.
    label: class index for labelled sets.
    caption: a caption of the whole video, stored in every record of it.

  Returns:
    The records in time order, or a `Skip` saying why the video cannot be used. Unexpected
    errors (bugs) are raised, not turned into a `Skip`.
  """
  if video_id is None:
    video_id = os.path.splitext(os.path.basename(video_path))[0]
  return _convert(video_path, transcript_path, options, video_id, label, caption)[0]


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
                               item.label, item.caption)
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
      "asr": stats.get("asr", ""),
  }
  if isinstance(result, Skip):
    return outcome, []
  return outcome, [((item.video_id, k), records.serialize(r)) for k, r in enumerate(result)]
