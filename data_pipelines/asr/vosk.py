"""The `vosk` backend: Kaldi models through Vosk. Small and fast on a CPU, one language per
model, no language detection.

The model is a Vosk model directory (`am/final.mdl`, `conf/`, `graph/`, ...). `vosk` is
imported when the backend is loaded, so the converter runs without it installed.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os

import numpy as np

from data_pipelines import transcripts
from data_pipelines.asr import base

# Samples fed per call: Vosk decodes as it goes; a few hundred ms per call is its usual use.
_CHUNK = base.SAMPLE_RATE // 4
_REQUIRED = ("am/final.mdl", "conf/model.conf")


@functools.lru_cache(maxsize=1)
def _libc():
  return ctypes.CDLL(None)  # the C library this process (and libvosk) links


class VoskBackend:
  """Vosk recogniser of one model directory.

  Vosk cannot tell languages apart: a model transcribes everything in its own language, and
  `language` (when given) is only what the transcripts are labelled with.
  """
  name = "vosk"

  def __init__(self, model: str, language: str | None = None, device: str = "cpu"):
    if device != "cpu":
      raise base.ModelError(f"the vosk backend runs on the CPU only (device={device!r})")
    base.check_language(language)
    missing = [f for f in _REQUIRED if not os.path.isfile(os.path.join(model, f))]
    if missing:
      raise base.ModelError(f"{model} is not a Vosk model directory: no {', '.join(missing)}")
    import vosk  # pylint: disable=g-import-not-at-top
    vosk.SetLogLevel(-1)
    self._vosk = vosk
    try:
      self._model = vosk.Model(model)
    except Exception as e:  # pylint: disable=broad-except
      # Vosk raises a bare Exception("Failed to create a model") for any unreadable model.
      raise base.ModelError(f"vosk cannot load the model in {model}: {e}") from None
    self.model = model
    self.language = language

  def transcribe(self, audio: np.ndarray) -> base.Transcript:
    # Kaldi dithers its features with noise from the C library's rand(): without a reseed,
    # a video's words would depend on what the process transcribed before (measured: "the"
    # or "them" for the same audio), and a conversion would not be a pure function of its
    # inputs. One recogniser at a time per process, so the seed is not shared.
    _libc().srand(0)
    recognizer = self._vosk.KaldiRecognizer(self._model, base.SAMPLE_RATE)
    recognizer.SetWords(True)
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    results = []
    for i in range(0, len(pcm), 2 * _CHUNK):
      if recognizer.AcceptWaveform(pcm[i:i + 2 * _CHUNK]):
        results.append(recognizer.Result())  # an utterance ended
    results.append(recognizer.FinalResult())
    segments = []
    for text in results:
      words = [transcripts.Word(w["word"], float(w["start"]), float(w["end"]))
               for w in json.loads(text).get("result", [])]
      if words:
        segments.append(base.Segment(words[0].start, words[-1].end, words))
    return base.Transcript(segments, self.language or "", None,
                           audio.size / base.SAMPLE_RATE)
