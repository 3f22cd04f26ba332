"""Decoding a video with PyAV and sampling its frames at a fixed rate.

Decode with PyAV (local files, or any tf.io.gfile path such as gs://...), take the frame
nearest each time k/fps, resize it so the short side is `short_side`, JPEG-encode it. A
video that cannot be used raises `VideoError` with a reason code of
`video_records.SKIP_REASONS` (`video_missing`, `video_unreadable`, ...); the converter turns it
into a skip, as it does a `transcripts.TranscriptError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from typing import Protocol

import av
from PIL import Image
import tensorflow as tf



class DecodeOptions(Protocol):
  """What decoding reads of the conversion options (`video_records.Options` has them)."""
  fps: float
  short_side: int
  jpeg_quality: int
  max_bad_packets: int

# Container metadata that is not UTF-8 (common in old AVI/MKV files) must not make a video
# unreadable. PyAV < 19 raises on it unless told `metadata_errors="ignore"`; PyAV 19 decodes it
# with surrogateescape and no longer takes the argument.
AV_OPEN_KWARGS = ({"metadata_errors": "ignore"}
                   if int(av.__version__.split(".")[0]) < 19 else {})


class VideoError(Exception):
  """A video that cannot be used; `reason` is a `video_records.SKIP_REASONS` key."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail


def is_remote(path: str) -> bool:
  """Whether `path` is a tf.io.gfile URL (gs://...) rather than a local path."""
  return "://" in path


def file_size(path: str) -> int:
  """Bytes of a local or tf.io.gfile file; VideoError `video_missing` if there is none."""
  try:
    return tf.io.gfile.stat(path).length if is_remote(path) else os.path.getsize(path)
  except (OSError, tf.errors.NotFoundError):
    raise VideoError("video_missing", path) from None


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

  def __init__(self, options: DecodeOptions):
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


def decode_video(path: str, options: DecodeOptions) -> DecodedVideo:
  """Decodes a video and samples its frames at `options.fps` (see `_NearestFrameSampler`).

  Args:
    path: local path or any tf.io.gfile path (gs://...).
    options: conversion options (uses fps, short_side, jpeg_quality, max_bad_packets).

  Returns:
    The sampled frames as JPEG bytes with their presentation times (s from the stream start)
    and the duration (end of the last frame).

  Raises:
    VideoError: the file is missing, empty, unreadable, truncated or has no video.
  """
  if file_size(path) == 0:
    raise VideoError("video_empty", "0 bytes")
  sampler = _NearestFrameSampler(options)
  with contextlib.ExitStack() as stack:
    try:
      source = stack.enter_context(tf.io.gfile.GFile(path, "rb")) if is_remote(path) else path
      container = stack.enter_context(av.open(source, **AV_OPEN_KWARGS))
    except av.error.FFmpegError as e:
      raise VideoError("video_unreadable", str(e)) from None
    if not container.streams.video:
      kinds = sorted({s.type for s in container.streams})
      raise VideoError("no_video_stream", f"streams: {kinds}")
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
            raise VideoError("video_decode_error",
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
      raise VideoError("video_decode_error", str(e)) from None
  if last_time is None:
    raise VideoError("no_frames", f"{bad_packets} undecodable packets")
  duration = last_time + last_length
  if header_duration and duration < header_duration - max(1.0, 0.05 * header_duration):
    raise VideoError("video_truncated",
                     f"frames end at {duration:.2f} s, header says {header_duration:.2f} s")
  sampler.finish(duration)
  width, height = sampler.size
  return DecodedVideo(sampler.jpegs, sampler.times, duration, width, height)
