"""What every speech recogniser backend shares: the errors, the result, the interface.

A backend (`faster_whisper.py`, `vosk.py`) is loaded once from a local model directory (never
downloaded) and turns 16 kHz mono float32 audio into words with start and end times.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Protocol, Sequence

from data_pipelines import transcripts

SAMPLE_RATE = 16_000  # what both backends' models are trained on
# Reason codes of a video that yields no transcript (they are also `prepare`'s skip reasons).
REASONS = {
    "no_audio_stream": "the file has no audio stream",
    "audio_decode_error": "more than `max_bad_packets` audio packets failed to decode, or "
                          "demuxing the audio failed",
    "no_speech": "the audio is silent, or the recogniser found no words in it",
    "wrong_language": "the recogniser detected another language than the one asked for",
}
# A language is an ISO 639-1/639-3 code, as Whisper and Vosk's model names use them.
_LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}$")


class AsrError(Exception):
  """A video that yields no transcript. `reason`: a `REASONS` key or a video reason of
  `video_records.SKIP_REASONS` (`video_missing`, `video_unreadable`, ...)."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail


class ModelError(ValueError):
  """A model that cannot be used (missing, unreadable, not of the backend, a language it does
  not have): raised when the backend is loaded, before any video is touched."""


@dataclasses.dataclass
class Segment:
  """An utterance: its words, in time order, times in seconds from the start of the audio."""
  start: float
  end: float
  words: list[transcripts.Word]


@dataclasses.dataclass
class Transcript:
  """What a backend heard in one audio track."""
  segments: list[Segment]
  language: str  # ISO code; the asked-for one where the backend cannot detect languages
  language_probability: float | None  # None: not detected
  duration: float  # seconds of audio

  @property
  def words(self) -> list[transcripts.Word]:
    return [w for s in self.segments for w in s.words]


class Backend(Protocol):
  """A loaded speech recogniser."""
  name: str  # the backend's name, `faster-whisper` or `vosk`
  model: str  # the model directory
  language: str | None  # the language asked for (None: any)

  def transcribe(self, audio) -> Transcript:
    """16 kHz mono float32 samples -> words. Raises AsrError (`wrong_language`)."""


def check_language(language: str | None) -> None:
  if language is not None and not _LANGUAGE_CODE.match(language):
    raise ModelError(f"language={language!r} is not a language code: give an ISO 639 code "
                     "such as 'en', 'de' or 'yue'")


def tidy(segments: Sequence[Segment], duration: float) -> list[Segment]:
  """Makes a backend's output safe to store: words inside the audio, monotone times.

  Recognisers emit times past the end of the audio (Whisper's timestamps hallucinate on noise
  and silence) and, rarely, words whose start goes back. Words that start at or after the end,
  or are not finite, are dropped; ends are clipped to [start, duration]; starts never go back
  (a word that would is moved to the previous word's start); words without a letter or digit
  (punctuation, Whisper's stray byte tokens) are dropped, as `transcripts.clean_text` does.

  Args:
    segments: what the backend returned.
    duration: seconds of audio.

  Returns:
    Segments with at least one word, in time order.
  """
  out, latest = [], 0.0
  for seg in segments:
    words = []
    for w in seg.words:
      text = transcripts.clean_text(w.text)
      if not text or not (math.isfinite(w.start) and math.isfinite(w.end)):
        continue
      start = max(w.start, latest, 0.0)
      if start >= duration:
        continue
      words.append(transcripts.Word(text, start, min(max(w.end, start), duration)))
      latest = start
    if words:
      out.append(Segment(words[0].start, max(w.end for w in words), words))
  return out
