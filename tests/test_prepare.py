"""The video converter on tiny videos made here: frames, times, windows, skips, engines."""

import collections
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import av
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from data_pipelines import decode
from data_pipelines import listing
from data_pipelines import prepare
from data_pipelines import progress
from data_pipelines import records
from data_pipelines import shards
from data_pipelines import video_records

FPS = 10  # source frame rate of the test videos
SHORT = 32  # stored short side, small to keep the tests fast


def make_video(path, seconds, *, codec="libx264", faststart=False, title=None):
  """A 64x48 video whose left half's grey level is (n % 10) * 25 and right half's is
  (n // 10) * 12 for frame n: any decoded frame tells which source frame it is."""
  options = {"movflags": "faststart"} if faststart else {}
  with av.open(str(path), "w", options=options) as container:
    if title is not None:
      container.metadata["title"] = title
    stream = container.add_stream(
        codec, rate=FPS, options={"crf": "10"} if codec == "libx264" else {"qscale": "2"})
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    for n in range(round(seconds * FPS)):
      img = np.zeros((48, 64, 3), np.uint8)
      img[:, :32] = (n % 10) * 25
      img[:, 32:] = (n // 10) * 12
      frame = av.VideoFrame.from_ndarray(img, format="rgb24")
      frame.pts = n
      container.mux(stream.encode(frame))
    container.mux(stream.encode())
  return str(path)


def make_audio_only(path):
  with av.open(str(path), "w") as container:
    stream = container.add_stream("aac", rate=16000, layout="mono")
    for i in range(8):
      frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                         layout="mono")
      frame.sample_rate, frame.pts = 16000, i * 1024
      container.mux(stream.encode(frame))
    container.mux(stream.encode())


def source_frame(jpeg):
  """The source frame index a stored JPEG shows (inverse of `make_video`'s pattern)."""
  img = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"), np.float32)
  half = img.shape[1] // 2
  left, right = img[:, 2:half - 3].mean(), img[:, half + 3:-2].mean()
  return int(round(left / 25)) + 10 * int(round(right / 12))


def vtt(words):
  """A YouTube-style VTT: one cue per 2 words, inline times on the second word."""
  out = ["WEBVTT", "Kind: captions", ""]
  for i in range(0, len(words), 2):
    (w0, s0, e0), (w1, s1, e1) = words[i], words[i + 1]
    out += [f"{_ts(s0)} --> {_ts(e1)} align:start position:0%", " ",
            f"{w0}<{_ts(s1)}><c> {w1}</c>", ""]
    assert e0 == s1
  return "\n".join(out)


def _ts(t):
  return f"{int(t // 3600):02d}:{int(t % 3600 // 60):02d}:{t % 60:06.3f}"


def whisper(words):
  return json.dumps({"segments": [{"start": s, "end": e, "text": w,
                                   "words": [{"word": " " + w, "start": s, "end": e}]}
                                  for w, s, e in words]})


def read_shard(path):
  return [records.parse_numpy(r) for r in
          tf.data.TFRecordDataset(path).as_numpy_iterator()]


def read_all(out_dir):
  info = records.read_info(str(out_dir))
  recs = []
  for name in info["files"]:
    recs += read_shard(os.path.join(out_dir, name))
  return info, {r["video_id"]: r for r in recs}


def options(**kw):
  return video_records.Options(**{"short_side": SHORT, **kw})


# ------------------------------------------------------------------------------------------
# One video.

@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  return make_video(tmp_path_factory.mktemp("clip") / "clip.mp4", 16)


@pytest.mark.parametrize("fps", [2.0, 3.0])
def test_frames_at_fps_nearest_source_frame(clip, fps):
  recs = video_records.convert_video(clip, None, options(fps=fps, require_transcripts=False))
  assert len(recs) == 1
  r = recs[0]
  assert (r.video_id, r.duration, r.start_time, r.height, r.width) == ("clip", 16.0, 0.0,
                                                                       32, 43)
  # One frame per 1/fps over the 16 s, each the source frame (0.1 s apart) nearest k / fps.
  want = [round(k / fps * FPS) for k in range(int(16 * fps))]
  assert len(r.frames) == len(want)
  np.testing.assert_allclose(r.frame_times, np.array(want) / FPS, atol=1e-9)
  assert [source_frame(f) for f in r.frames] == want
  assert Image.open(io.BytesIO(r.frames[0])).size == (43, 32)


def test_default_keeps_a_10_s_video_with_words(tmp_path):
  # A 10 s clip with speech was lost to the old 15 s minimum; the input pipeline now shortens
  # the span of such a video, so the converter keeps it.
  video = make_video(tmp_path / "ten.mp4", 10)
  (tmp_path / "ten.json").write_text(whisper(GOOD_WORDS[:4]))
  recs = video_records.convert_video(video, str(tmp_path / "ten.json"),
                                     video_records.Options(short_side=SHORT))
  assert len(recs) == 1 and recs[0].duration == 10.0 and len(recs[0].words) == 4
  five = video_records.convert_video(make_video(tmp_path / "five.mp4", 5), None,
                                     options(require_transcripts=False))
  assert five.reason == "too_short"


def test_metadata_that_is_not_utf8_does_not_stop_a_video(tmp_path):
  # Old files often carry Latin-1 titles. Written as UTF-8, then one byte made Latin-1 (same
  # length, so the container stays valid): PyAV < 19 raises UnicodeDecodeError on it unless
  # asked not to, PyAV 19 no longer takes that argument; either way the video converts.
  path = tmp_path / "latin1.mkv"
  make_video(path, 16, title="cafe latin-1")
  raw = path.read_bytes()
  assert raw.count(b"cafe latin-1") == 1
  path.write_bytes(raw.replace(b"cafe latin-1", b"caf\xe9 latin-1"))
  recs = video_records.convert_video(str(path), None, options(fps=2.0, require_transcripts=False))
  assert len(recs) == 1 and len(recs[0].frames) == 32


def test_windows_hold_their_frames_and_words(tmp_path):
  video = make_video(tmp_path / "long.mp4", 20)
  words = [("zero", 0.5, 1.0), ("one", 7.5, 7.9), ("edge", 8.0, 8.6), ("late", 15.0, 16.0),
           ("last", 19.0, 19.5), ("after", 20.5, 21.0)]
  (tmp_path / "long.json").write_text(whisper(words))
  # 8 s windows: [0, 8), [8, 16) and a 4 s rest shorter than min_duration -> [8, 20).
  opts = options(window_seconds=8, min_duration=5)
  recs = video_records.convert_video(video, str(tmp_path / "long.json"), opts)
  assert [r.video_id for r in recs] == ["long@0", "long@1"]
  assert [(r.start_time, r.duration) for r in recs] == [(0.0, 8.0), (8.0, 12.0)]
  assert recs[0].words == ["zero", "one"]
  np.testing.assert_allclose(recs[0].word_starts, [0.5, 7.5])
  np.testing.assert_allclose(recs[0].word_ends, [1.0, 7.9])
  # "edge" starts on the boundary: it belongs to the second window; times are relative.
  assert recs[1].words == ["edge", "late", "last"]
  np.testing.assert_allclose(recs[1].word_starts, [0.0, 7.0, 11.0])
  np.testing.assert_allclose(recs[1].word_ends, [0.6, 8.0, 11.5])
  for r in recs:
    np.testing.assert_allclose(r.frame_times, np.arange(r.duration * 2) / 2, atol=1e-9)
    assert [source_frame(f) for f in r.frames] == [
        round((r.start_time + t) * FPS) for t in r.frame_times]
  # The word after the video's end is dropped and counted.
  item = video_records.VideoItem(video, str(tmp_path / "long.json"), "long")
  outcome, serialized = video_records.process_item(item, opts)
  assert (outcome["reason"], outcome["words"], outcome["words_past_end"]) == ("", 5, 1)
  assert [records.parse_numpy(b)["video_id"] for _, b in serialized] == ["long@0", "long@1"]


def test_window_bounds():
  opts = video_records.Options(fps=2, window_seconds=8, min_duration=3)
  assert video_records.window_bounds(20.0, opts) == [(0, 0.0, 8.0), (16, 8.0, 16.0),
                                                     (32, 16.0, 20.0)]
  assert video_records.window_bounds(18.0, opts) == [(0, 0.0, 8.0), (16, 8.0, 18.0)]
  assert video_records.window_bounds(7.0, opts) == [(0, 0.0, 7.0)]
  # Window length is rounded to whole frames: 7.3 s at 2 fps -> 15 frames = 7.5 s.
  assert video_records.window_bounds(16.0, video_records.Options(
      fps=2, window_seconds=7.3, min_duration=1))[1] == (15, 7.5, 15.0)


def test_unexpected_error_becomes_a_counted_skip(monkeypatch, clip):
  def broken(*args):
    raise KeyError("bug")
  monkeypatch.setattr(decode, "decode_video", broken)
  item = video_records.VideoItem(clip, None, "clip")
  outcome, serialized = video_records.process_item(item, options(require_transcripts=False))
  assert outcome["reason"] == "error: KeyError" and serialized == []
  # convert_video itself does not hide bugs.
  with pytest.raises(KeyError):
    video_records.convert_video(clip, None, options(require_transcripts=False))


# ------------------------------------------------------------------------------------------
# A directory with good and bad videos, through both engines.

GOOD_WORDS = [("we", 1.0, 1.5), ("mix", 1.5, 2.0), ("the", 6.0, 6.4), ("flour", 6.4, 7.0),
              ("then", 12.0, 12.5), ("bake", 12.5, 13.0)]
EXPECTED_SKIPS = {
    "corrupt": "video_unreadable",
    "empty_video": "video_empty",
    "truncated": "video_truncated",
    "cut_moov": "video_unreadable",
    "audio": "no_video_stream",
    "short": "too_short",
    "no_transcript": "transcript_missing",
    "empty_transcript": "transcript_empty",
    "bad_json": "transcript_malformed",
    "unordered": "transcript_unordered",
    "wrong_transcript": "transcript_past_end",
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  d = tmp_path_factory.mktemp("videos")
  good = make_video(d / "good_vtt.mp4", 16)
  (d / "good_vtt.en.vtt").write_text(vtt(GOOD_WORDS))
  (d / "good_vtt.info.json").write_text("{}")  # yt-dlp metadata: not a transcript
  (d / "sub").mkdir()  # listing is recursive
  make_video(d / "sub" / "good_srt.mkv", 17)
  (d / "sub" / "good_srt.srt").write_text(
      "1\n00:00:01,000 --> 00:00:03,000\nwe mix\n\n2\n00:00:06,000 --> 00:00:08,000\nthe flour\n")
  make_video(d / "good_yt.avi", 16, codec="mpeg4")
  (d / "good_yt.json").write_text(json.dumps(
      {"subtitles": [{"word": w, "time": s} for w, s, _ in GOOD_WORDS]}))
  make_video(d / "good_whisper.mp4", 18)
  (d / "good_whisper.json").write_text(whisper(GOOD_WORDS))
  # Bad videos, each with a good transcript unless the transcript is the problem.
  (d / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))  # fixed: no flakes
  (d / "empty_video.mp4").write_bytes(b"")
  data = open(make_video(d / "truncated.mp4", 16, faststart=True), "rb").read()
  (d / "truncated.mp4").write_bytes(data[:len(data) // 2])  # index first: frames cut short
  (d / "cut_moov.mp4").write_bytes(open(good, "rb").read()[:-200])  # index last: lost
  make_audio_only(d / "audio.mp4")
  make_video(d / "short.mp4", 5)
  for stem in ("no_transcript", "empty_transcript", "bad_json", "unordered",
               "wrong_transcript"):
    shutil.copy(good, d / f"{stem}.mp4")
  for stem in ("corrupt", "empty_video", "truncated", "cut_moov", "audio", "short"):
    (d / f"{stem}.json").write_text(whisper(GOOD_WORDS))
  (d / "empty_transcript.vtt").write_text("")
  (d / "bad_json.json").write_text('{"segments": [')
  (d / "unordered.json").write_text(json.dumps(
      {"subtitles": [{"word": "a", "time": 9.0}, {"word": "b", "time": 2.0}]}))
  (d / "wrong_transcript.json").write_text(whisper([("x", 30.0, 31.0), ("y", 40.0, 41.0)]))
  return d


@pytest.fixture(scope="module")
def local_out(videos, tmp_path_factory):
  out = tmp_path_factory.mktemp("local")
  stale = out / records.shard_name("tvts", "train", 0, 9)
  stale.write_bytes(b"from an earlier run")
  info = prepare.prepare(str(videos), str(out), 2, options())
  assert not stale.exists()
  return out, info


def test_bad_videos_skipped_by_reason_good_ones_kept(videos, local_out):
  out, info = local_out
  assert info["skipped"] == dict(collections.Counter(EXPECTED_SKIPS.values()))
  assert (info["videos"], info["kept_videos"], info["skipped_videos"]) == (15, 4, 11)
  skipped = [json.loads(l) for l in open(out / shards.SKIPPED_FILE)]
  assert {s["video_id"]: s["reason"] for s in skipped} == EXPECTED_SKIPS
  _, recs = read_all(out)
  assert sorted(recs) == ["good_srt", "good_vtt", "good_whisper", "good_yt"]
  assert info["shard_counts"] == {info["files"][0]: 2, info["files"][1]: 2}
  assert info["num_records"] == 4
  # Each shard mixes good and bad videos, and its good ones all arrived.
  items, _ = listing.list_videos(str(videos), 2)
  for shard in (0, 1):
    ids = {it.video_id for it in items if it.shard == shard}
    assert ids & set(EXPECTED_SKIPS) and ids & set(recs)
    got = [r["video_id"] for r in read_shard(out / info["files"][shard])]
    assert got == sorted(ids & set(recs))  # sorted by id inside a shard
  assert info["options"]["require_transcripts"] is True
  assert info["hours"] == pytest.approx((16 + 17 + 16 + 18) / 3600, abs=1e-4)


def test_each_transcript_format_stored_exactly(local_out):
  _, recs = read_all(local_out[0])
  for vid in ("good_vtt", "good_whisper"):
    r = recs[vid]
    assert r["words"] == [w for w, _, _ in GOOD_WORDS], vid
    np.testing.assert_allclose(r["word_starts"], [s for _, s, _ in GOOD_WORDS], atol=1e-6)
    np.testing.assert_allclose(r["word_ends"], [e for _, _, e in GOOD_WORDS], atol=1e-6)
  # YT-Temporal: ends from the next word, at most 1 s.
  np.testing.assert_allclose(recs["good_yt"]["word_ends"],
                             [1.5, 2.5, 6.4, 7.4, 12.5, 13.5], atol=1e-6)
  # SRT: two words per 2 s cue.
  np.testing.assert_allclose(recs["good_srt"]["word_starts"], [1, 2, 6, 7], atol=1e-6)
  assert recs["good_srt"]["duration"] == pytest.approx(17.0)
  assert recs["good_srt"]["source"].endswith("sub/good_srt.mkv")
  for r in recs.values():
    assert r["fps"] == 2.0 and r["label"] == -1 and (r["height"], r["width"]) == (32, 43)
    np.testing.assert_allclose(r["frame_times"], np.arange(len(r["frames"])) / 2, atol=1e-6)
    if r["video_id"] != "good_yt":  # mpeg4's blockier greys are not checked frame by frame
      assert [source_frame(f) for f in r["frames"][::5]] == [
          round(t * FPS) for t in r["frame_times"][::5]]


def test_beam_direct_runner_writes_identical_bytes(videos, local_out, tmp_path):
  out, info = local_out
  beam_info = prepare.prepare(
      str(videos), str(tmp_path), 2, options(), runner="DirectRunner",
      pipeline_args=["--direct_num_workers=2", "--direct_running_mode=multi_threading"])
  assert beam_info["engine"] == "beam:DirectRunner"
  assert {**beam_info, "engine": "local"} == info
  for name in info["files"] + [shards.SKIPPED_FILE]:
    assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
  assert sorted(os.listdir(tmp_path)) == sorted(
      info["files"] + [shards.SKIPPED_FILE, records.INFO_FILE])


def test_manifest_with_csv_labels(videos, tmp_path):
  manifest = tmp_path / "set.csv"
  with open(manifest, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["video", "transcript", "label", "caption"])
    w.writerow([str(videos / "good_whisper.mp4"), str(videos / "good_whisper.json"), "walk",
                "a man walks the dog"])
    w.writerow([os.path.relpath(videos / "short.mp4", tmp_path), "", "jump", ""])
    w.writerow([str(videos / "good_vtt.mp4"), "", "run", ""])
    w.writerow([str(videos / "no_transcript.mp4"), "", "", ""])
    w.writerow([str(videos / "missing.mp4"), "", "run", ""])
  out = tmp_path / "out"
  info = prepare.prepare(None, str(out), 1, options(), manifest=str(manifest),
                         labels="csv", split="test")
  assert info["class_names"] == ["jump", "run", "walk"]
  assert info["skipped"] == {"no_label": 1, "too_short": 1, "video_missing": 1}
  _, recs = read_all(out)
  assert {k: r["label"] for k, r in recs.items()} == {"good_vtt": 1, "good_whisper": 2}
  assert recs["good_vtt"]["words"] == []  # labelled sets need no transcript
  assert recs["good_whisper"]["words"] == [w for w, _, _ in GOOD_WORDS]
  # The caption column (caption retrieval) is stored; an empty cell is "".
  assert (recs["good_whisper"]["caption"], recs["good_vtt"]["caption"]) == (
      "a man walks the dog", "")
  assert info["files"] == ["tvts-test.tfrecord-00000-of-00001"]


def test_manifest_integer_labels_kept(tmp_path):
  manifest = tmp_path / "m.csv"
  manifest.write_text("video,label\na.mp4,12\nb.mp4,3\n")
  items, class_names = listing.read_manifest(str(manifest), 2, labels="csv")
  assert class_names is None
  assert [(it.video_id, it.label, it.shard) for it in items] == [("a", 12, 0), ("b", 3, 1)]
  assert items[0].video == str(tmp_path / "a.mp4")


def test_label_folders(videos, tmp_path):
  root = tmp_path / "ucf"
  for cls, names in {"Walk": ["v_walk_1", "v_walk_2"], "Jump": ["v_jump_1"]}.items():
    (root / cls).mkdir(parents=True)
    for n in names:
      shutil.copy(videos / "good_vtt.mp4", root / cls / f"{n}.mp4")
  (root / "Walk" / "v_walk_2.json").write_text("{not json")  # ignored: not required here
  shutil.copy(videos / "good_vtt.mp4", root / "stray.mp4")
  out = tmp_path / "out"
  info = prepare.prepare(str(root), str(out), 2, options(), labels="folders", name="ucf101")
  assert info["class_names"] == ["Jump", "Walk"]
  assert info["skipped"] == {"no_label": 1}
  assert info["transcripts_ignored"] == {"transcript_malformed": 1}
  _, recs = read_all(out)
  assert {k: r["label"] for k, r in recs.items()} == {"v_jump_1": 0, "v_walk_1": 1,
                                                      "v_walk_2": 1}
  assert all(r["words"] == [] for r in recs.values())


def test_duplicate_stems_get_relative_ids(tmp_path):
  for d in ("a", "b"):
    (tmp_path / d).mkdir()
    (tmp_path / d / "clip.mp4").write_bytes(b"")
  items, _ = listing.list_videos(str(tmp_path), 3)
  assert [it.video_id for it in items] == ["a/clip", "b/clip"]


def test_command_line_with_worker_pool_writes_identical_bytes(videos, local_out, tmp_path):
  # The command line, a pool of 2 spawned workers: records made in other processes and by
  # another engine configuration must equal the in-process local run byte for byte.
  out, info = local_out
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "-m", "data_pipelines.prepare", f"--videos={videos}",
       f"--output_dir={tmp_path}", "--num_shards=2", f"--short_side={SHORT}", "--workers=2"],
      cwd=root, capture_output=True, text=True, timeout=300,
      env={**os.environ, "PYTHONPATH": root, "CUDA_VISIBLE_DEVICES": ""})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "skipped: video_truncated" in proc.stdout
  for name in info["files"] + [shards.SKIPPED_FILE, records.INFO_FILE]:
    assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_command_line_rejects_pipeline_options_for_local_runner(tmp_path):
  with pytest.raises(ValueError, match="need a Beam runner"):
    prepare.prepare(str(tmp_path), str(tmp_path / "out"), 1,
                    pipeline_args=["--direct_num_workers=2"])


def test_local_engine_runs_without_importing_beam(clip, tmp_path):
  # Apache Beam is imported by beam_engine alone, when a Beam runner is asked for: the local
  # engine and every other module of the converter work without Beam installed.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = "\n".join([
      "import sys",
      "from data_pipelines import decode, listing, prepare, shards, video_records",
      f"info = prepare.prepare({os.path.dirname(clip)!r}, {str(tmp_path)!r}, 1,",
      f"    video_records.Options(short_side={SHORT}, require_transcripts=False))",
      "assert info['num_records'] == 1, info",
      "assert 'apache_beam' not in sys.modules, 'apache_beam was imported'",
  ])
  proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                        text=True, timeout=300,
                        env={**os.environ, "PYTHONPATH": root, "CUDA_VISIBLE_DEVICES": ""})
  assert proc.returncode == 0, proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------
# Resume: a conversion killed part-way, started again.

def _noise_video(path, seconds, width=160, height=120, rate=25):
  """A video of random pixels: slow to decode, so later shards are still under way when the
  first one is complete."""
  with av.open(str(path), "w") as container:
    stream = container.add_stream("libx264", rate=rate,
                                  options={"crf": "30", "preset": "ultrafast"})
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    rng = np.random.default_rng(0)
    for n in range(round(seconds * rate)):
      frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (height, width, 3), np.uint8),
                                         format="rgb24")
      frame.pts = n
      container.mux(stream.encode(frame))
    container.mux(stream.encode())


RESUME_SHARDS = 4


@pytest.fixture(scope="module")
def resume_videos(tmp_path_factory):
  """12 videos in 4 shards (round-robin over the sorted ids): shard 0 holds small videos, the
  others slow ones; one video has no transcript (a skip, so skipped.jsonl has a line)."""
  d = tmp_path_factory.mktemp("resume")
  small = make_video(d / "v00.mp4", 8)
  _noise_video(d / "v01.mp4", 12)
  for i in range(2, 12):
    shutil.copy(small if i % RESUME_SHARDS == 0 else d / "v01.mp4", d / f"v{i:02d}.mp4")
  for i in range(12):
    if i != 6:
      (d / f"v{i:02d}.json").write_text(whisper(GOOD_WORDS[:4]))
  return d


def _copy_and_convert(resume_videos, tmp_path):
  """A copy of the videos (records hold their paths) and its uninterrupted conversion."""
  videos, ref_out = tmp_path / "videos", tmp_path / "reference"
  shutil.copytree(resume_videos, videos)
  info = prepare.prepare(str(videos), str(ref_out), RESUME_SHARDS, options())
  assert info["skipped"] == {"transcript_missing": 1} and info["kept_videos"] == 11
  return videos, ref_out, info


def _output_files(info):
  return info["files"] + [shards.SKIPPED_FILE, records.INFO_FILE]


def _corrupt_videos_of(videos_dir, shard_ids):
  """Overwrites the videos of the given shards: a run that decodes them again skips them."""
  items, _ = listing.list_videos(str(videos_dir), RESUME_SHARDS)
  for it in items:
    if it.shard in shard_ids:
      with open(it.video, "wb") as f:
        f.write(np.random.default_rng(1).bytes(2048))


def test_sigkilled_conversion_resumes_byte_identical(resume_videos, tmp_path):
  videos, ref_out, info = _copy_and_convert(resume_videos, tmp_path)
  out = tmp_path / "out"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  command = [sys.executable, "-m", "data_pipelines.prepare", f"--videos={videos}",
             f"--output_dir={out}", f"--num_shards={RESUME_SHARDS}", f"--short_side={SHORT}",
             "--workers=2"]
  env = {**os.environ, "PYTHONPATH": root, "CUDA_VISIBLE_DEVICES": ""}
  # The conversion runs in its own process group, so that SIGKILL reaches the pool's
  # workers too, as when a machine is preempted.
  proc = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, start_new_session=True)
  progress_dir = out / ".progress-tvts-train"
  first_marker = progress_dir / f"shard-00000-of-{RESUME_SHARDS:05d}.json"
  try:
    deadline = time.monotonic() + 240
    while not first_marker.exists():
      assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
      assert time.monotonic() < deadline, "no shard completed in time"
      time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  markers = sorted(p.name for p in progress_dir.glob("shard-*.json"))
  assert 1 <= len(markers) < RESUME_SHARDS, markers  # killed part-way
  assert not (out / records.INFO_FILE).exists()
  done = [int(m.split("-")[1]) for m in markers]

  # Other arguments are refused, naming what differs; nothing is written.
  with pytest.raises(progress.ArgumentsChanged, match=r"options\.fps: 2\.0 in the earlier "
                     r"run, 3\.0 now"):
    prepare.prepare(str(videos), str(out), RESUME_SHARDS, options(fps=3.0))
  with pytest.raises(progress.ArgumentsChanged, match="num_shards: 4 in the earlier run, 5"):
    prepare.prepare(str(videos), str(out), RESUME_SHARDS + 1, options())
  shutil.copy(videos / "v00.mp4", videos / "zz.mp4")
  with pytest.raises(progress.ArgumentsChanged, match=r"1 videos added \(zz\)"):
    prepare.prepare(str(videos), str(out), RESUME_SHARDS, options())
  os.remove(videos / "zz.mp4")
  assert sorted(p.name for p in progress_dir.glob("shard-*.json")) == markers

  # The same arguments again (here in this process, which is quicker to start) finish the
  # job without decoding the complete shards' videos (they are garbage now: decoding them
  # would skip them) and write the uninterrupted bytes.
  _corrupt_videos_of(videos, done)
  prepare.prepare(str(videos), str(out), RESUME_SHARDS, options())
  for name in _output_files(info):
    assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name
  assert not progress_dir.exists()


def test_beam_resumes_a_local_conversion_that_died(resume_videos, tmp_path, monkeypatch):
  videos, ref_out, info = _copy_and_convert(resume_videos, tmp_path)
  out = tmp_path / "out"
  write_shard = shards.write_shard

  def dies_at_shard_2(output_dir, name, split, index, *args):
    if index == 2:
      raise SystemExit("killed")
    return write_shard(output_dir, name, split, index, *args)

  monkeypatch.setattr(shards, "write_shard", dies_at_shard_2)
  with pytest.raises(SystemExit):
    prepare.prepare(str(videos), str(out), RESUME_SHARDS, options())
  monkeypatch.setattr(shards, "write_shard", write_shard)
  _corrupt_videos_of(videos, {0, 1})
  beam_info = prepare.prepare(
      str(videos), str(out), RESUME_SHARDS, options(), runner="DirectRunner",
      pipeline_args=["--direct_num_workers=2", "--direct_running_mode=multi_threading"])
  assert {**beam_info, "engine": "local"} == info  # the summary names the engine
  for name in info["files"] + [shards.SKIPPED_FILE]:
    assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name
  # Finished: the directory holds the output alone, and a run started again converts from
  # scratch (here: sees the corrupted videos) instead of refusing or resuming.
  assert sorted(os.listdir(out)) == sorted(_output_files(info))
  again = prepare.prepare(str(videos), str(out), RESUME_SHARDS, options())
  assert again["skipped"]["video_unreadable"] == 6


def test_restart_drops_an_unfinished_conversion(resume_videos, tmp_path, monkeypatch):
  out = tmp_path / "out"
  monkeypatch.setattr(prepare, "_run_local", lambda *args: None)  # dies before any shard
  with pytest.raises(RuntimeError, match="shard 0 of 4 .* has no completion marker"):
    prepare.prepare(str(resume_videos), str(out), RESUME_SHARDS, options())
  monkeypatch.undo()
  with pytest.raises(progress.ArgumentsChanged):
    prepare.prepare(str(resume_videos), str(out), 2, options())
  info = prepare.prepare(str(resume_videos), str(out), 2, options(), restart=True)
  assert info["num_shards"] == 2 and info["kept_videos"] == 11
