"""Speech recognition on speech synthesised here: vosk's words and times against what was spoken,
the transcribe command (JSON, bad input, resume), prepare --asr, and faster-whisper's
plumbing on a tiny random Whisper."""

import json
import os
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest

from data_pipelines import asr
from data_pipelines import prepare
from data_pipelines import records
from data_pipelines import transcribe
from data_pipelines import transcripts
from data_pipelines import video_records
import speech


def _require(ok, what):
  # CI installs everything these tests need (.ci/run, setup.py [test]); there, a missing
  # piece is a failure, not a skip.
  if not ok:
    (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{what} is not installed")


@pytest.fixture(scope="module")
def vosk_model():
  path = speech.vosk_model()
  _require(path is not None and shutil.which("espeak-ng"), "videogrep's vosk model or espeak-ng")
  return path


@pytest.fixture(scope="module")
def spoken(vosk_model, tmp_path_factory):
  """A directory: a video with three spoken sentences, and videos that yield no transcript."""
  d = tmp_path_factory.mktemp("speech")
  track, times = speech.speech_track()
  speech.write_video(d / "speech.mp4", track)
  speech.write_video(d / "noaudio.mp4", None)
  speech.write_video(d / "silent.mp4", np.zeros_like(track))
  (d / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
  speech.write_video(d / "captioned.mp4", track)
  (d / "captioned.en.vtt").write_text("WEBVTT\n\n00:01.000 --> 00:03.000\nhello there\n")
  return d, times


@pytest.fixture(scope="module")
def transcribed(spoken, vosk_model):
  d, _ = spoken
  info = transcribe.transcribe(str(d), "vosk", vosk_model, language="en")
  return d, info


def _check_words_where_spoken(words, times, tolerance=0.5):
  """Every word inside a sentence's spoken interval (± tolerance); each sentence's first word
  within `tolerance` of its spoken start. Returns (WER, the largest start error)."""
  recognised = [[w for w in words if s - tolerance <= w.start <= e + tolerance]
                for _, s, e in times]
  assert sum(map(len, recognised)) == len(words), "words outside every spoken sentence"
  errors = [abs(ws[0].start - s) for ws, (_, s, _) in zip(recognised, times)]
  assert max(errors) <= tolerance, errors
  reference = speech.normalise(" ".join(t for t, _, _ in times).split())
  wer = speech.word_error_rate(reference, speech.normalise(w.text for w in words))
  return wer, max(errors)


def test_vosk_recognises_the_spoken_words_where_they_were_spoken(transcribed, spoken):
  d, info = transcribed
  _, times = spoken
  words, made_by = transcripts.read_transcript(str(d / "speech.json"))
  assert made_by == "vosk:model"
  wer, timing = _check_words_where_spoken(words, times)
  print(f"vosk on espeak-ng: WER {wer:.3f}, first-word start error {timing:.3f} s")
  assert wer <= 0.4  # measured 0.32: homophones (flour/flower), espeak's "then", "bake"
  obj = json.loads((d / "speech.json").read_text())
  assert obj["language"] == "en" and obj["asr"] == {"backend": "vosk", "model": "vosk:model"}
  assert obj["duration"] == pytest.approx(speech.DURATION, abs=0.1)


def test_transcribe_counts_what_it_cannot_use_and_keeps_existing_transcripts(transcribed):
  d, info = transcribed
  assert info["skipped"] == {"no_audio_stream": 1, "no_speech": 1, "video_unreadable": 1}
  assert (info["videos"], info["had_transcript"], info["transcribed"]) == (5, 1, 1)
  assert {os.path.basename(f["video"]): f["reason"] for f in info["failures"]} == {
      "noaudio.mp4": "no_audio_stream", "silent.mp4": "no_speech",
      "corrupt.mp4": "video_unreadable"}
  assert not (d / "captioned.json").exists()  # it has captions
  assert sorted(p.name for p in d.iterdir() if p.name.startswith(".")) == []  # no temp files
  # Run again: the JSON written is kept as it is; only the videos without one are tried.
  before = (d / "speech.json").read_bytes()
  again = transcribe.transcribe(str(d), "vosk", speech.vosk_model(), language="en")
  assert (again["had_transcript"], again["transcribed"]) == (2, 0)
  assert (d / "speech.json").read_bytes() == before
  assert "skipped: no_audio_stream" in transcribe.format_summary(again)


def test_corrupt_audio_packets_become_silence_not_a_shift(spoken, vosk_model, tmp_path):
  d, times = spoken
  path = tmp_path / "broken.mp4"
  data = bytearray((d / "speech.mp4").read_bytes())
  with av.open(str(d / "speech.mp4")) as container:
    packets = [(p.pos, p.size, float(p.pts * p.time_base))
               for p in container.demux(container.streams.audio[0]) if p.size]
  # Four packets (~0.19 s) inside the second sentence: dropped without filling their time,
  # every later word would come 0.19 s early.
  broken = [p for p in packets if p[2] >= 7.0][:4]
  rng = np.random.default_rng(0)
  for pos, size, _ in broken:
    data[pos:pos + size] = rng.bytes(size)
  path.write_bytes(bytes(data))
  backend = asr.cached("vosk", vosk_model, "en")
  clean = asr.transcribe_file(str(d / "speech.mp4"), backend).words
  damaged = asr.transcribe_file(str(path), backend).words
  samples = asr.audio.decode_audio(str(path))
  assert samples.size == asr.audio.decode_audio(str(d / "speech.mp4")).size
  third = [w for w in clean if w.start >= 10.5]
  third_damaged = [w for w in damaged if w.start >= 10.5]
  # The damage may change a word of the context ("the" -> "them"), not where words are.
  assert len(third_damaged) == len(third)
  assert third_damaged[0].start == pytest.approx(third[0].start, abs=0.05)
  assert third_damaged[-1].end == pytest.approx(third[-1].end, abs=0.05)
  with pytest.raises(asr.AsrError, match="audio_decode_error"):
    asr.transcribe_file(str(path), backend, max_bad_packets=3)


def test_model_problems_are_errors_before_any_video(spoken, vosk_model, tmp_path):
  d, _ = spoken
  videos = tmp_path / "videos"
  videos.mkdir()
  shutil.copy(d / "speech.mp4", videos / "a.mp4")
  with pytest.raises(asr.ModelError, match="does not exist"):
    transcribe.transcribe(str(videos), "vosk", str(tmp_path / "no_model"))
  with pytest.raises(asr.ModelError, match="not a Vosk model directory"):
    transcribe.transcribe(str(videos), "vosk", str(videos))
  with pytest.raises(asr.ModelError, match="not a language code"):
    transcribe.transcribe(str(videos), "vosk", vosk_model, language="english")
  with pytest.raises(asr.ModelError, match="expected BACKEND:MODEL_PATH"):
    video_records.Options(asr="kaldi:/models/x")
  with pytest.raises(asr.ModelError, match="does not exist"):
    prepare.prepare(str(videos), str(tmp_path / "out"), 1,
                    video_records.Options(asr=f"vosk:{tmp_path / 'no_model'}"))
  assert sorted(os.listdir(videos)) == ["a.mp4"] and not (tmp_path / "out").exists()


def test_prepare_asr_records_hold_the_recognised_words(spoken, transcribed, vosk_model,
                                                      tmp_path):
  d, times = spoken
  videos = tmp_path / "videos"
  videos.mkdir()
  for name in ("speech.mp4", "noaudio.mp4", "captioned.mp4", "captioned.en.vtt"):
    shutil.copy(d / name, videos / name)
  opts = video_records.Options(short_side=32, asr=f"vosk:{vosk_model}", asr_language="en")
  info = prepare.prepare(str(videos), str(tmp_path / "out"), 1, opts)
  # Beam loads the model in DoFn.setup and writes the same bytes.
  prepare.prepare(str(videos), str(tmp_path / "beam"), 1, opts, runner="DirectRunner")
  for name in info["files"] + ["skipped.jsonl"]:
    assert (tmp_path / "beam" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()
  assert info["asr_transcripts"] == 1 and info["skipped"] == {"no_audio_stream": 1}
  assert info["options"]["asr"] == f"vosk:{vosk_model}"
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  recs = {r["video_id"]: r for r in map(records.parse_numpy, tf.data.TFRecordDataset(
      str(tmp_path / "out" / info["files"][0])).as_numpy_iterator())}
  assert recs["captioned"]["transcript_asr"] == "" and recs["captioned"]["words"] == [
      "hello", "there"]
  r = recs["speech"]
  assert r["transcript_asr"] == "vosk:model"
  words = [transcripts.Word(*w) for w in zip(r["words"], r["word_starts"], r["word_ends"])]
  _check_words_where_spoken(words, times)
  # The same words as the two-step way (transcribe, then prepare reads the JSON).
  words_json, _ = transcripts.read_transcript(str(d / "speech.json"))
  assert r["words"] == [w.text for w in words_json]
  np.testing.assert_allclose(r["word_starts"], [w.start for w in words_json], atol=1e-6)


# ------------------------------------------------------------------------------------------
# faster-whisper: the plumbing, on a randomly initialised Whisper (its words are noise).

@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory, spoken):
  for module in ("faster_whisper", "ctranslate2", "transformers", "torch"):
    try:
      __import__(module)
    except ImportError:
      _require(False, module)
  # Built in a child process: importing transformers (and the triton it pulls in) into a
  # process that has TensorFlow and JAX loaded crashes it.
  directory = str(tmp_path_factory.mktemp("whisper"))
  here = os.path.dirname(os.path.abspath(__file__))
  proc = subprocess.run(
      [sys.executable, "-c", f"import sys; sys.path.insert(0, {here!r}); import speech; "
       f"speech.tiny_whisper({directory!r})"],
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return os.path.join(directory, "ct2")


def test_faster_whisper_json_times_and_language_filter(tiny_whisper, spoken, tmp_path):
  d, _ = spoken
  videos = tmp_path / "videos"
  videos.mkdir()
  shutil.copy(d / "speech.mp4", videos / "speech.mp4")
  info = transcribe.transcribe(str(videos), "faster-whisper", tiny_whisper)
  assert info["transcribed"] == 1, info
  obj = json.loads((videos / "speech.json").read_text())
  assert obj["asr"] == {"backend": "faster-whisper", "model": "faster-whisper:ct2"}
  assert set(obj) == {"language", "language_probability", "duration", "segments", "asr"}
  assert 0 < obj["language_probability"] <= 1
  starts = [w["start"] for s in obj["segments"] for w in s["words"]]
  assert starts and starts == sorted(starts)
  for s in obj["segments"]:
    assert set(s) == {"start", "end", "text", "words"} and s["start"] <= s["end"]
    for w in s["words"]:
      assert 0 <= w["start"] <= w["end"] <= obj["duration"] and w["word"].strip()
  assert len(transcripts.parse_file(str(videos / "speech.json"))) == len(starts)
  # The language filter: another language than the detected one is skipped, and a language
  # the model lacks, or a model without a tokenizer (which would be downloaded), is an error.
  detected = obj["language"]
  other = "de" if detected != "de" else "fr"
  backend = asr.load("faster-whisper", tiny_whisper, language=other)
  with pytest.raises(asr.AsrError, match=f"wrong_language: detected '{detected}'"):
    asr.transcribe_file(str(videos / "speech.mp4"), backend)
  with pytest.raises(asr.ModelError, match="not one of the model's languages"):
    asr.load("faster-whisper", tiny_whisper, language="xx")
  no_tokenizer = tmp_path / "no_tokenizer"
  shutil.copytree(tiny_whisper, no_tokenizer)
  os.remove(no_tokenizer / "tokenizer.json")
  with pytest.raises(asr.ModelError, match="no tokenizer.json"):
    asr.load("faster-whisper", str(no_tokenizer))
