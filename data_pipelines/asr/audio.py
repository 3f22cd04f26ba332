"""A video's audio track with PyAV: 16 kHz mono float32, samples at their presentation times.

No ffmpeg binary is needed (PyAV links FFmpeg's libraries). Samples are placed where their
frames' timestamps say: an audio packet that fails to decode leaves silence of its length
instead of pulling every later word earlier.
"""

from __future__ import annotations

import contextlib

import av
import numpy as np
import tensorflow as tf

from data_pipelines import decode
from data_pipelines.asr import base

# A frame later than the samples so far by more than this is a gap (a lost packet, or a
# stream that starts late): filled with silence. Below it, resampler delay and rounding.
_GAP_SECONDS = 0.02
# Peak amplitude (full scale 1.0) under which a track is silent: -60 dBFS.
SILENCE_PEAK = 1e-3


def decode_audio(path: str, sample_rate: int = base.SAMPLE_RATE,
                 max_bad_packets: int = 5) -> np.ndarray:
  """Decodes the first audio stream of a file to mono float32 at `sample_rate`.

  Args:
    path: local path or any tf.io.gfile path (gs://...).
    sample_rate: output rate.
    max_bad_packets: undecodable packets tolerated (each becomes silence of its length).

  Returns:
    float32 [num_samples] in [-1, 1], sample i at time i / sample_rate from the stream start.

  Raises:
    base.AsrError: missing, empty or unreadable file (`video_missing`, `video_empty`,
      `video_unreadable`), no audio stream (`no_audio_stream`), too many bad packets or a
      demuxing failure (`audio_decode_error`).
  """
  try:
    size = decode.file_size(path)
  except decode.VideoError as e:
    raise base.AsrError(e.reason, e.detail) from None
  if size == 0:
    raise base.AsrError("video_empty", "0 bytes")
  chunks, have, bad_packets = [], 0, 0
  with contextlib.ExitStack() as stack:
    try:
      source = stack.enter_context(tf.io.gfile.GFile(path, "rb")) if decode.is_remote(
          path) else path
      container = stack.enter_context(av.open(source, **decode.AV_OPEN_KWARGS))
    except av.error.FFmpegError as e:
      raise base.AsrError("video_unreadable", str(e)) from None
    if not container.streams.audio:
      kinds = sorted({s.type for s in container.streams})
      raise base.AsrError("no_audio_stream", f"streams: {kinds}")
    stream = container.streams.audio[0]
    offset = (float(stream.start_time * stream.time_base) if stream.start_time is not None
              else 0.0)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)

    def emit(frames):
      nonlocal have
      for out in frames:
        samples = out.to_ndarray().reshape(-1)
        chunks.append(samples)
        have += samples.size

    try:
      for packet in container.demux(stream):
        try:
          frames = packet.decode()
        except av.error.FFmpegError as e:  # a broken AAC packet is EPERM, not InvalidData
          bad_packets += 1
          if bad_packets > max_bad_packets:
            raise base.AsrError("audio_decode_error",
                                f"{bad_packets} undecodable audio packets; last: {e}") from None
          continue
        for frame in frames:
          if frame.pts is not None:
            at = round((float(frame.pts * frame.time_base) - offset) * sample_rate)
            if at - have > _GAP_SECONDS * sample_rate:
              emit(resampler.resample(None))  # what the resampler holds comes first
              resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
              if at > have:
                chunks.append(np.zeros(at - have, np.float32))
                have = at
          emit(resampler.resample(frame))
      emit(resampler.resample(None))
    except av.error.FFmpegError as e:
      raise base.AsrError("audio_decode_error", str(e)) from None
  if not chunks:
    return np.zeros(0, np.float32)
  return np.clip(np.concatenate(chunks).astype(np.float32, copy=False), -1.0, 1.0)


def is_silent(samples: np.ndarray) -> bool:
  """Whether a track holds nothing to recognise (no sample above -60 dBFS)."""
  return samples.size == 0 or float(np.max(np.abs(samples))) < SILENCE_PEAK
