"""Speech recognition for videos without captions: audio track -> word-timed transcript.

    backend = asr.load("vosk", "/models/vosk-model-en-us-0.22", language="en")
    transcript = asr.transcribe_file("video.mp4", backend)   # raises asr.AsrError
    json.dumps(asr.whisper_json(transcript, backend))        # what transcripts.py reads

Backends (`BACKENDS`) load a local model directory, never a download: `faster-whisper`
(Whisper through CTranslate2: accurate, word timestamps, VAD, language detection; for GPU hosts
or many CPU cores) and `vosk` (Kaldi: small, fast on a CPU, one language per model). Each is
imported when loaded, so nothing here needs either installed until it is used. Audio is
decoded with PyAV (`audio.py`). The command `python -m data_pipelines.transcribe` writes a
JSON beside each video; `prepare --asr=BACKEND:MODEL` transcribes inline.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from data_pipelines.asr import audio
from data_pipelines.asr.base import (  # noqa: F401  (the package's interface)
    AsrError, Backend, ModelError, REASONS, SAMPLE_RATE, Segment, Transcript, tidy)

BACKENDS = ("faster-whisper", "vosk")
# The key of a transcript JSON written here: says which backend and model made it.
SOURCE_KEY = "asr"


def load(backend: str, model: str, language: str | None = None, device: str = "cpu"
         ) -> Backend:
  """Loads a backend with its model; every problem is a ModelError before any video.

  Args:
    backend: one of `BACKENDS`.
    model: the model directory (local; nothing is downloaded).
    language: ISO code of the language wanted: faster-whisper skips videos it detects in
      another language (`wrong_language`); vosk labels its transcripts with it. None: any.
    device: `cpu` or `cuda` (faster-whisper only).

  Returns:
    The loaded backend.

  Raises:
    ModelError: unknown backend, a model path that is missing or not a directory of that
      backend's model, a language the model does not have, a device it cannot use.
  """
  if backend not in BACKENDS:
    raise ModelError(f"unknown ASR backend {backend!r}; one of {BACKENDS}")
  if not os.path.isdir(model):
    raise ModelError(f"the {backend} model directory {model!r} does not exist (models are "
                     "local directories; nothing is downloaded)")
  if not os.access(model, os.R_OK | os.X_OK):
    raise ModelError(f"the {backend} model directory {model!r} is not readable")
  if backend == "vosk":
    from data_pipelines.asr import vosk  # pylint: disable=g-import-not-at-top
    return vosk.VoskBackend(model, language, device)
  from data_pipelines.asr import faster_whisper  # pylint: disable=g-import-not-at-top
  return faster_whisper.FasterWhisperBackend(model, language, device)


@functools.lru_cache(maxsize=2)
def cached(backend: str, model: str, language: str | None = None, device: str = "cpu"
           ) -> Backend:
  """`load`, once per process: each converter worker loads its model once."""
  return load(backend, model, language, device)


def parse_spec(spec: str) -> tuple[str, str]:
  """`BACKEND:MODEL_PATH` (the converter's `--asr`) -> (backend, model path)."""
  backend, sep, model = spec.partition(":")
  if not sep or backend not in BACKENDS or not model:
    raise ModelError(f"--asr={spec!r}: expected BACKEND:MODEL_PATH with BACKEND one of "
                     f"{BACKENDS}, e.g. vosk:/models/vosk-model-en-us-0.22")
  return backend, model


def identity(backend: Backend) -> str:
  """What records and JSON files say made a transcript: `BACKEND:MODEL_DIRECTORY_NAME`."""
  return f"{backend.name}:{os.path.basename(os.path.normpath(backend.model))}"


def transcribe_file(path: str, backend: Backend, max_bad_packets: int = 5) -> Transcript:
  """Transcribes the audio track of a video file.

  Args:
    path: the video (local or tf.io.gfile path).
    backend: a loaded backend.
    max_bad_packets: undecodable audio packets tolerated (each becomes silence).

  Returns:
    The transcript: at least one word, every word inside the audio, times monotone.

  Raises:
    AsrError: no audio stream, a broken file or audio, silence or no words (`no_speech`),
      another language (`wrong_language`).
  """
  samples = audio.decode_audio(path, SAMPLE_RATE, max_bad_packets)
  duration = samples.size / SAMPLE_RATE
  if audio.is_silent(samples):
    raise AsrError("no_speech", f"silent audio ({duration:.2f} s)")
  transcript = backend.transcribe(samples)
  transcript.segments = tidy(transcript.segments, duration)
  if not transcript.segments:
    raise AsrError("no_speech", f"no words recognised in {duration:.2f} s of audio")
  return transcript


def whisper_json(transcript: Transcript, backend: Backend) -> dict[str, Any]:
  """The transcript as Whisper-style JSON (what `transcripts.parse_whisper` reads), with the
  backend and model that made it under `SOURCE_KEY`."""
  segments = [{"start": round(s.start, 3), "end": round(s.end, 3),
               "text": " ".join(w.text for w in s.words),
               "words": [{"word": w.text, "start": round(w.start, 3), "end": round(w.end, 3)}
                         for w in s.words]}
              for s in transcript.segments]
  return {"language": transcript.language,
          "language_probability": transcript.language_probability,
          "duration": round(transcript.duration, 3),
          "segments": segments,
          SOURCE_KEY: {"backend": backend.name, "model": identity(backend)}}
