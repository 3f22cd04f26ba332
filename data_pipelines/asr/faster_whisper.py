"""The `faster-whisper` backend: Whisper through CTranslate2. The accurate one, for GPU hosts
or many CPU cores: word timestamps, a voice activity filter (Silero VAD, shipped inside
faster-whisper) and language detection.

The model is a CTranslate2 conversion of a Whisper model (`model.bin`, `config.json`,
`vocabulary.*`, `tokenizer.json`): e.g. `ct2-transformers-converter --model openai/whisper-small
--output_dir DIR --copy_files tokenizer.json preprocessor_config.json`. `tokenizer.json` is
required: without it faster-whisper would download one. `faster_whisper` is imported when the
backend is loaded, so the converter runs without it installed.
"""

from __future__ import annotations

import os

import numpy as np

from data_pipelines import transcripts
from data_pipelines.asr import base

_REQUIRED = ("model.bin", "config.json", "tokenizer.json")


class FasterWhisperBackend:
  """Whisper recogniser of one CTranslate2 model directory.

  Decoding is beam search at temperature 0 without Whisper's sampling fallback and without
  conditioning on the previous window, so a transcript is a pure function of the audio (a
  conversion resumed, or run on another engine, writes the same bytes); conditioning also
  lets one hallucination repeat into the next windows.
  """
  name = "faster-whisper"

  def __init__(self, model: str, language: str | None = None, device: str = "cpu",
               compute_type: str = "default", cpu_threads: int = 0, beam_size: int = 5):
    base.check_language(language)
    missing = [f for f in _REQUIRED if not os.path.isfile(os.path.join(model, f))]
    if missing:
      raise base.ModelError(f"{model} is not a CTranslate2 Whisper model directory: no "
                            f"{', '.join(missing)}")
    import faster_whisper  # pylint: disable=g-import-not-at-top
    try:
      self._model = faster_whisper.WhisperModel(
          model, device=device, compute_type=compute_type, cpu_threads=cpu_threads,
          local_files_only=True)
    except (RuntimeError, ValueError, OSError) as e:
      raise base.ModelError(f"faster-whisper cannot load the model in {model}: {e}") from None
    self.supported_languages = list(self._model.supported_languages)
    if language is not None and language not in self.supported_languages:
      shown = ", ".join(self.supported_languages[:20])
      raise base.ModelError(
          f"language={language!r} is not one of the model's languages ({shown}"
          f"{', ...' if len(self.supported_languages) > 20 else ''})")
    self.multilingual = self._model.model.is_multilingual
    self.model = model
    self.language = language
    self._beam_size = beam_size

  def transcribe(self, audio: np.ndarray) -> base.Transcript:
    # Language detection runs before any text is decoded (the segments are a generator), so
    # a video in another language costs one 30 s window.
    segments, info = self._model.transcribe(
        audio, language=None if self.multilingual else "en", beam_size=self._beam_size,
        temperature=0.0, condition_on_previous_text=False, word_timestamps=True,
        vad_filter=True)
    if self.language is not None and info.language != self.language:
      raise base.AsrError("wrong_language", f"detected {info.language!r} (probability "
                          f"{info.language_probability:.2f}), not {self.language!r}")
    out = []
    for seg in segments:
      words = [transcripts.Word(w.word, float(w.start), float(w.end)) for w in seg.words or ()]
      out.append(base.Segment(float(seg.start), float(seg.end), words))
    probability = float(info.language_probability) if self.multilingual else None
    return base.Transcript(out, info.language, probability, audio.size / base.SAMPLE_RATE)
