"""Transcribes the videos that have no transcript: a Whisper-style JSON beside each one.

    python -m data_pipelines.transcribe --videos=DIR --backend=vosk --model=MODEL_DIR
    python -m data_pipelines.transcribe --manifest=set.csv --backend=faster-whisper \
        --model=whisper-small-ct2 --language=en --device=cuda

Every video under DIR (or in the manifest) without a transcript beside it (`STEM.json`,
`.vtt`, `.srt`, `STEM.LANG.EXT`, the same rule as `prepare`; for a manifest, an empty
transcript cell and no `STEM.json` yet) gets `STEM.json`: Whisper-style segments with per-word
start and end times, which `prepare` then reads as any other transcript, plus the backend and
model that made it (key `asr`). The model must be a local directory; a missing or unusable
one is an error before any video is touched.

A JSON is written under a temporary name and renamed, so a killed run leaves no half file, and
existing transcripts are never touched: running the command again continues where it stopped.
Videos without an audio stream, silent ones, those in another language than `--language`
(faster-whisper detects it) and those that fail are counted by reason, and never stop the
others; no JSON is written for them.
"""

from __future__ import annotations

import collections
import contextlib
import json
import multiprocessing
import os
import time
from typing import Any, Sequence

from absl import logging
import tensorflow as tf
import tqdm

from data_pipelines import asr
from data_pipelines import listing
from data_pipelines import progress
from data_pipelines import video_records


def output_path(video: str) -> str:
  """Where the transcript of `video` goes: `STEM.json` beside it."""
  return os.path.splitext(video)[0] + ".json"


def _todo(videos: str | None, manifest: str | None
          ) -> tuple[list[video_records.VideoItem], int]:
  """The listed videos that need a transcript, and how many already have one."""
  if (videos is None) == (manifest is None):
    raise ValueError("give exactly one of videos (a directory) and manifest (a CSV)")
  items, _ = (listing.read_manifest(manifest, 1) if manifest
              else listing.list_videos(videos, 1))
  todo = [it for it in items
          if not it.transcript and not tf.io.gfile.exists(output_path(it.video))]
  return todo, len(items) - len(todo)


_BACKEND: asr.Backend | None = None  # the model of this worker process


def _init_worker(backend: str, model: str, language: str | None, device: str):
  global _BACKEND
  _BACKEND = asr.cached(backend, model, language, device)


def _transcribe_one(item: video_records.VideoItem) -> dict[str, Any]:
  """Transcribes one video and writes its JSON; never raises for a bad video."""
  outcome = {"video": item.video, "reason": "", "detail": "", "words": 0, "seconds": 0.0}
  try:
    transcript = asr.transcribe_file(item.video, _BACKEND)
    progress.write_atomic(output_path(item.video),
                          json.dumps(asr.whisper_json(transcript, _BACKEND), indent=1))
    outcome.update(words=len(transcript.words), seconds=transcript.duration)
  except asr.AsrError as e:
    outcome.update(reason=e.reason, detail=e.detail)
  except Exception as e:  # pylint: disable=broad-except
    # One unforeseen failure must not end a run over a whole corpus: logged with its
    # traceback and counted under its own reason.
    logging.exception("unexpected error transcribing %s", item.video)
    outcome.update(reason=f"error: {type(e).__name__}", detail=str(e)[:500])
  return outcome


def transcribe(videos: str | None, backend: str, model: str, *, manifest: str | None = None,
               language: str | None = None, device: str = "cpu", workers: int = 1
               ) -> dict[str, Any]:
  """Writes a transcript JSON beside every listed video that has none.

  Args:
    videos: directory of videos (recursive); or None with `manifest`.
    backend: one of `asr.BACKENDS`.
    model: the backend's model directory.
    manifest: CSV with a `video` column (and `transcript`) instead of `videos`.
    language: ISO code: faster-whisper skips videos in other languages; None: any.
    device: `cpu` or `cuda`.
    workers: processes, each with its own copy of the model.

  Returns:
    The summary: `videos`, `had_transcript`, `transcribed`, `words`, `audio_hours`,
    `seconds` (wall), `skipped` (count per reason) and `failures` (video, reason, detail).

  Raises:
    asr.ModelError: the model cannot be used (before any video is read).
  """
  start = time.perf_counter()
  _init_worker(backend, model, language, device)  # checks the model before any video
  todo, had = _todo(videos, manifest)
  logging.info("%d videos to transcribe with %s (%d have a transcript)", len(todo),
               asr.identity(_BACKEND), had)
  outcomes = []
  with contextlib.ExitStack() as stack:
    if workers > 1 and len(todo) > 1:
      asr.cached.cache_clear()  # the workers load their own
      # spawn: the parent has TensorFlow loaded, which is not safe to fork.
      pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(
          workers, initializer=_init_worker, initargs=(backend, model, language, device)))
      results = pool.imap_unordered(_transcribe_one, todo)
    else:
      results = map(_transcribe_one, todo)
    bar = stack.enter_context(tqdm.tqdm(total=len(todo), unit="video", desc="transcribe"))
    counts = collections.Counter()
    for outcome in results:
      outcomes.append(outcome)
      counts[outcome["reason"] or "transcribed"] += 1
      bar.set_postfix(dict(counts), refresh=False)
      bar.update(1)
  skipped = collections.Counter(o["reason"] for o in outcomes if o["reason"])
  return {
      "backend": backend, "model": model, "language": language,
      "videos": len(todo) + had, "had_transcript": had,
      "transcribed": sum(not o["reason"] for o in outcomes),
      "words": sum(o["words"] for o in outcomes),
      "audio_hours": round(sum(o["seconds"] for o in outcomes) / 3600, 4),
      "seconds": round(time.perf_counter() - start, 2),
      "skipped": dict(sorted(skipped.items())),
      "failures": sorted(({k: o[k] for k in ("video", "reason", "detail")}
                          for o in outcomes if o["reason"]), key=lambda o: o["video"]),
  }


def format_summary(info: dict[str, Any]) -> str:
  """A printable table of a summary, then one line per video without a transcript."""
  audio_s = info["audio_hours"] * 3600
  rows = [("videos", info["videos"]),
          ("had a transcript (kept)", info["had_transcript"]),
          ("transcribed", f"{info['transcribed']}  ({info['audio_hours']:.3f} h of audio, "
                          f"{info['words']} words)")]
  rows += [(f"skipped: {reason}", n) for reason, n in info["skipped"].items()]
  if audio_s and info["seconds"]:
    rows.append(("speed", f"{audio_s / info['seconds']:.1f}x real time (wall clock, "
                          "loading included)"))
  width = max(len(k) for k, _ in rows)
  lines = [f"  {k:<{width}}  {v}" for k, v in rows]
  lines += [f"  {o['reason']}: {o['video']} {o['detail']}" for o in info["failures"][:50]]
  return "\n".join(lines)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("videos", None, "directory of videos (searched recursively)")
  flags.DEFINE_string("manifest", None, "CSV with columns video[,transcript] instead of "
                      "--videos")
  flags.DEFINE_enum("backend", None, list(asr.BACKENDS), "speech recogniser", required=True)
  flags.DEFINE_string("model", None, "the backend's model directory (local; nothing is "
                      "downloaded)", required=True)
  flags.DEFINE_string("language", None, "ISO code of the language wanted (faster-whisper "
                      "skips videos it detects in another one)")
  flags.DEFINE_enum("device", "cpu", ["cpu", "cuda"], "where the model runs")
  flags.DEFINE_integer("workers", 1, "processes, each with its own model")


def _main(argv: Sequence[str]):
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  if argv[1:]:
    raise app.UsageError(f"unknown arguments {argv[1:]}")
  f = flags.FLAGS
  tf.config.set_visible_devices([], "GPU")  # TensorFlow only lists files here
  try:
    info = transcribe(f.videos, f.backend, f.model, manifest=f.manifest, language=f.language,
                      device=f.device, workers=f.workers)
  except (asr.ModelError, ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  print(format_summary(info))


def cli():
  """Entry point of `python -m data_pipelines.transcribe`."""
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(_main)


if __name__ == "__main__":
  cli()
