"""Caption and ASR transcript parsing: every supported format -> words with (start, end) times.

    words = transcripts.parse_file("video.en.vtt")   # [Word("hello", 0.0, 0.32), ...]

Formats (detected from the extension, or from the content when the extension says nothing):

| format        | file    | word times                                                      |
|---------------|---------|-----------------------------------------------------------------|
| `vtt`         | `.vtt`  | inline `<00:00:01.234>` timings (YouTube auto-captions) where   |
|               |         | present, else the cue's words spread evenly over the cue        |
| `srt`         | `.srt`  | the cue's words spread evenly over the cue                      |
| `yt_temporal` | `.json` | `{"subtitles": [{"word", "time"}], "duration"?}` (YT-Temporal / |
|               |         | MERLOT): end = the next word's time, at most `MAX_WORD_SECONDS` |
| `whisper`     | `.json` | `{"segments": [{"start", "end", "text", "words"?: [{"word",     |
|               |         | "start", "end"}]}]}`; a segment without words: spread evenly    |

Text cleaning drops markup (`<c>`, `<i>`, `<v Name>`, `{\\an8}`), decodes HTML entities, and
drops speaker marks (`>>`, `- `, `NAME:`), non-speech tags (`[Music]`, `(laughs)`), music
notes and tokens without a letter or digit.

YouTube auto-captions are "rolling": each cue repeats the line before it. A cue's leading lines
that equal the previous cue's trailing lines are dropped, so each spoken word appears once.
The same rule applies to SRT files made from such captions; a speaker who says the very same
whole line twice in two consecutive cues loses the repeat (rare, and harmless for training).

Time order: words are returned sorted by start time. A word that starts at most `max_jitter`
seconds (default 1 s) before a word already seen is mild jitter (overlapping cues, ASR
alignment noise) and is sorted into place. Anything further out of order means the file's
times cannot be trusted, and `TranscriptError` with reason `transcript_unordered` is raised;
`data_pipelines.prepare` then skips the video and says why.

Every failure raises `TranscriptError`, whose `reason` is one of `REASONS`.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from typing import Any, NamedTuple, Sequence

import tensorflow as tf

FORMATS = ("vtt", "srt", "yt_temporal", "whisper")
EXTENSIONS = (".json", ".vtt", ".srt")  # preference order when several sit beside a video
REASONS = ("transcript_unreadable", "transcript_empty", "transcript_malformed",
           "transcript_unordered")
# A YT-Temporal word has only a start; its end is the next word's start, but a word followed
# by a pause should not stretch over the pause.
MAX_WORD_SECONDS = 1.0
DEFAULT_MAX_JITTER = 1.0


class Word(NamedTuple):
  text: str
  start: float
  end: float


class TranscriptError(ValueError):
  """A transcript that cannot be used; `reason` is one of `REASONS`."""

  def __init__(self, reason: str, message: str):
    assert reason in REASONS, reason
    super().__init__(f"{reason}: {message}")
    self.reason = reason
    self.detail = message


# ------------------------------------------------------------------------------------------
# Text cleaning.

_TIME = r"(?:\d+:)?\d{1,2}:\d{1,2}(?:[.,]\d{1,3})?"
_CUE_TIMING = re.compile(rf"^\s*({_TIME})\s*-->\s*({_TIME})")
_INLINE_TIME = re.compile(rf"<({_TIME})>")
_TAG = re.compile(r"<[^>]*>")
_LINE_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_ASS_OVERRIDE = re.compile(r"\{\\[^}]*\}")
_NON_SPEECH = re.compile(r"\[[^\]]*\]|\([^)]*\)|[♪♫]")
_SPEAKER_LABEL = re.compile(r"^\s*(?:-+\s+|[A-Z][A-Z0-9 .'\-]{0,30}:\s+)")
_SPEAKER_CHANGE = re.compile(r">>+")


def clean_text(text: str) -> str:
  """Removes markup, entities, speaker marks and non-speech tags; returns spoken text.

  Args:
    text: one caption line (or a word, or a segment's text).

  Returns:
    The spoken words separated by single spaces ("" if nothing is spoken).
  """
  # Tags go before entities are decoded, so an escaped "&lt;" stays text. Formatting tags
  # may sit inside a word ("<b>wel</b>come,"), so they vanish; timestamps and <br> separate.
  text = _LINE_BREAK.sub(" ", _INLINE_TIME.sub(" ", text))
  text = _ASS_OVERRIDE.sub("", _TAG.sub("", text))
  text = html.unescape(text)
  text = _SPEAKER_CHANGE.sub(" ", text)
  text = _SPEAKER_LABEL.sub(" ", text)
  text = _NON_SPEECH.sub(" ", text)
  return " ".join(_tokens(text))


def _tokens(text: str) -> list[str]:
  # A lone "-" or "..." is punctuation, not a word a clip could be matched with.
  return [t for t in text.split() if any(c.isalnum() for c in t)]


def _spread(text: str, start: float, end: float) -> list[Word]:
  """The words of `text`, spread evenly over [start, end]."""
  tokens = _tokens(clean_text(text))
  step = max(end - start, 0.0) / max(len(tokens), 1)
  return [Word(t, start + i * step, start + (i + 1) * step) for i, t in enumerate(tokens)]


def _seconds(stamp: str) -> float:
  """`[hh:]mm:ss[.,mmm]` -> seconds."""
  clock, _, frac = stamp.replace(",", ".").partition(".")
  value = 0.0
  for part in clock.split(":"):
    value = value * 60 + int(part)
  return value + (float("0." + frac) if frac else 0.0)


# ------------------------------------------------------------------------------------------
# Cue-based formats: WebVTT and SubRip.

def _cues(text: str) -> list[tuple[float, float, list[str]]]:
  """Splits VTT/SRT text into (start, end, raw text lines) cues.

  A cue's text runs from its timing line to the first blank line. YouTube puts a line holding
  a single space right after the timing line; such lines are skipped, not taken as the end.
  Everything between cues (indices, identifiers, NOTE/STYLE blocks, the header) is ignored.
  """
  cues = []
  current = None
  in_text = False
  for line in text.splitlines():
    timing = _CUE_TIMING.match(line)
    if not timing and "-->" in line:  # the arrow is reserved for timing lines
      raise TranscriptError("transcript_malformed", f"bad cue timing line {line.strip()!r}")
    if timing:
      start, end = _seconds(timing.group(1)), _seconds(timing.group(2))
      if end < start:
        raise TranscriptError("transcript_malformed",
                              f"cue ends before it starts: {line.strip()!r}")
      current = (start, end, [])
      cues.append(current)
      in_text = True
    elif current is not None and in_text:
      if not line.strip():
        if line and not current[2]:
          continue  # YouTube's " " line before the text
        in_text = False
      else:
        current[2].append(line)
  return cues


def _cue_words(cues: Sequence[tuple[float, float, list[str]]]) -> list[Word]:
  """Words of the cues, with rolling-caption repeats removed."""
  words = []
  previous: list[str] = []
  for start, end, raw_lines in cues:
    lines = [clean_text(l) for l in raw_lines]
    keep = [(raw, clean) for raw, clean in zip(raw_lines, lines) if clean]
    clean_lines = [c for _, c in keep]
    overlap = _repeated_prefix(previous, clean_lines)
    previous = clean_lines
    text = "\n".join(raw for raw, _ in keep[overlap:])
    if not text:
      continue
    # Inline timestamps cut the text into chunks; chunk i runs from boundary i to i+1, the
    # first from the cue start and the last to the cue end. Without inline timestamps the
    # whole cue is one chunk, i.e. its words are spread evenly over the cue.
    parts = _INLINE_TIME.split(text)
    chunks, stamps = parts[0::2], [_seconds(s) for s in parts[1::2]]
    bounds = [start] + stamps + [end]
    for i, chunk in enumerate(chunks):
      words += _spread(chunk, bounds[i], max(bounds[i + 1], bounds[i]))
  return words


def _repeated_prefix(previous: Sequence[str], lines: Sequence[str]) -> int:
  """The largest k such that the first k `lines` equal the last k `previous` lines."""
  for k in range(min(len(previous), len(lines)), 0, -1):
    if list(previous[-k:]) == list(lines[:k]):
      return k
  return 0


def parse_vtt(text: str) -> list[Word]:
  """Parses WebVTT text (YouTube inline word timings included) into unsorted words."""
  if not text.lstrip("\ufeff").startswith("WEBVTT"):
    raise TranscriptError("transcript_malformed", "no WEBVTT header")
  return _cue_words(_cues(text))


def parse_srt(text: str) -> list[Word]:
  """Parses SubRip text into unsorted words (spread evenly over each cue)."""
  cues = _cues(text)
  if not cues and text.strip():
    raise TranscriptError("transcript_malformed", "no 'start --> end' cue timing found")
  return _cue_words(cues)


# ------------------------------------------------------------------------------------------
# JSON formats.

def _number(value: Any, what: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, str)):
    raise TranscriptError("transcript_malformed", f"{what} is {value!r}, not a number")
  try:
    return float(value)
  except ValueError:
    raise TranscriptError("transcript_malformed", f"{what} is {value!r}, not a number") from None


def parse_yt_temporal(obj: dict[str, Any], max_jitter: float = DEFAULT_MAX_JITTER
                      ) -> list[Word]:
  """Parses YT-Temporal JSON (`subtitles`: [{word, time}]) into sorted words.

  A word's end is the next word's start, at most `MAX_WORD_SECONDS` after its own start; the
  last word also ends by the file's `duration` (top level or under `info`) when given.
  """
  subs = obj.get("subtitles")
  if not isinstance(subs, list):
    raise TranscriptError("transcript_malformed", "'subtitles' is not a list")
  timed = []
  for i, sub in enumerate(subs):
    if not isinstance(sub, dict) or "word" not in sub or "time" not in sub:
      raise TranscriptError("transcript_malformed", f"subtitles[{i}] lacks 'word' or 'time'")
    timed.append((str(sub["word"]), _number(sub["time"], f"subtitles[{i}].time")))
  # Ends come from the next start, so the order must be settled first.
  timed = [timed[i] for i in _sorted_order([t for _, t in timed], max_jitter)]
  info = obj.get("info") if isinstance(obj.get("info"), dict) else {}
  duration = obj.get("duration", info.get("duration"))
  last_end = math.inf if duration is None else _number(duration, "duration")
  words = []
  for i, (text, time) in enumerate(timed):
    nxt = timed[i + 1][1] if i + 1 < len(timed) else last_end
    words += _spread(text, time, max(time, min(nxt, time + MAX_WORD_SECONDS)))
  return words


def parse_whisper(obj: dict[str, Any]) -> list[Word]:
  """Parses Whisper-style JSON into unsorted words.

  Segments with a `words` list use the word times; words without times (WhisperX leaves them
  out for some tokens) are spread over the gap between their timed neighbours. Segments
  without words have their text spread evenly over the segment.
  """
  segments = obj.get("segments")
  if not isinstance(segments, list):
    raise TranscriptError("transcript_malformed", "'segments' is not a list")
  words = []
  for i, seg in enumerate(segments):
    if not isinstance(seg, dict):
      raise TranscriptError("transcript_malformed", f"segments[{i}] is not an object")
    start = _number(seg.get("start"), f"segments[{i}].start")
    end = _number(seg.get("end"), f"segments[{i}].end")
    if end < start:
      raise TranscriptError("transcript_malformed", f"segments[{i}] ends before it starts")
    seg_words = seg.get("words")
    if not seg_words:
      words += _spread(str(seg.get("text", "")), start, end)
      continue
    if not isinstance(seg_words, list):
      raise TranscriptError("transcript_malformed", f"segments[{i}].words is not a list")
    words += _whisper_segment_words(seg_words, start, end, f"segments[{i}]")
  return words


def _whisper_segment_words(seg_words, seg_start, seg_end, where):
  """Timed words of one segment; untimed runs fill the gap between timed neighbours."""
  words, untimed = [], []
  cursor = seg_start
  for j, w in enumerate(seg_words):
    if not isinstance(w, dict) or "word" not in w:
      raise TranscriptError("transcript_malformed", f"{where}.words[{j}] lacks 'word'")
    if w.get("start") is None or w.get("end") is None:
      untimed.append(str(w["word"]))
      continue
    start = _number(w["start"], f"{where}.words[{j}].start")
    end = _number(w["end"], f"{where}.words[{j}].end")
    if untimed:
      words += _spread(" ".join(untimed), cursor, start)
      untimed = []
    words += _spread(str(w["word"]), start, end)
    cursor = end
  if untimed:
    words += _spread(" ".join(untimed), cursor, seg_end)
  return words


# ------------------------------------------------------------------------------------------
# Order, and the entry points.

def _sorted_order(starts: Sequence[float], max_jitter: float) -> list[int]:
  """Indices that sort `starts`; raises if a start is more than `max_jitter` out of order."""
  latest = -math.inf
  for i, t in enumerate(starts):
    if not math.isfinite(t):
      raise TranscriptError("transcript_malformed", f"word {i} has time {t}")
    if t < -max_jitter:
      raise TranscriptError("transcript_malformed", f"word {i} starts at {t:.3f} s < 0")
    if t < latest - max_jitter:
      raise TranscriptError(
          "transcript_unordered",
          f"word {i} starts at {t:.3f} s, after a word at {latest:.3f} s "
          f"(more than {max_jitter} s out of order)")
    latest = max(latest, t)
  return sorted(range(len(starts)), key=lambda i: starts[i])  # stable: ties keep file order


def _finish(words: Sequence[Word], max_jitter: float) -> list[Word]:
  """Checks times, sorts mild jitter and clamps tiny negatives; raises if nothing is left."""
  if not words:
    raise TranscriptError("transcript_empty", "no spoken words")
  out = []
  for i in _sorted_order([w.start for w in words], max_jitter):
    w = words[i]
    if not math.isfinite(w.end) or w.end < w.start - max_jitter:
      raise TranscriptError("transcript_malformed",
                            f"word {w.text!r} ends at {w.end} before its start {w.start}")
    start = max(w.start, 0.0)
    out.append(Word(w.text, start, max(w.end, start)))
  return out


def detect_format(path: str, text: str) -> str:
  """Returns the format name (one of `FORMATS`) of a transcript file.

  Args:
    path: file name; its extension decides when it is .vtt or .srt.
    text: the file's content, looked at for .json and unknown extensions.

  Returns:
    One of `FORMATS`.

  Raises:
    TranscriptError: the content matches no format.
  """
  ext = os.path.splitext(path)[1].lower()
  head = text.lstrip("\ufeff \t\r\n")
  if ext == ".vtt" or (ext != ".srt" and head.startswith("WEBVTT")):
    return "vtt"
  if ext == ".srt" or (ext != ".json" and re.search(_CUE_TIMING.pattern, text, re.M)):
    return "srt"
  if ext == ".json" or head.startswith("{"):
    obj = _load_json(text)
    if "subtitles" in obj:
      return "yt_temporal"
    if "segments" in obj:
      return "whisper"
    raise TranscriptError("transcript_malformed",
                          "JSON has neither 'subtitles' (YT-Temporal) nor 'segments' (Whisper)")
  raise TranscriptError("transcript_malformed", f"{path}: not VTT, SRT or JSON")


def _load_json(text: str) -> dict[str, Any]:
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise TranscriptError("transcript_malformed", f"bad JSON: {e}") from None
  if not isinstance(obj, dict):
    raise TranscriptError("transcript_malformed", "JSON top level is not an object")
  return obj


def parse_string(text: str, fmt: str, max_jitter: float = DEFAULT_MAX_JITTER) -> list[Word]:
  """Parses transcript text of a known format.

  Args:
    text: the file content.
    fmt: one of `FORMATS`.
    max_jitter: seconds a word may start before an earlier word and still be sorted into
      place; further out of order raises `transcript_unordered`.

  Returns:
    Words sorted by start time, each with start <= end, times >= 0.

  Raises:
    TranscriptError: empty, malformed or unordered input.
  """
  if not text.strip():
    raise TranscriptError("transcript_empty", "empty file")
  if fmt == "vtt":
    words = parse_vtt(text)
  elif fmt == "srt":
    words = parse_srt(text)
  elif fmt == "yt_temporal":
    words = parse_yt_temporal(_load_json(text), max_jitter)
  elif fmt == "whisper":
    words = parse_whisper(_load_json(text))
  else:
    raise ValueError(f"unknown transcript format {fmt!r}; one of {FORMATS}")
  return _finish(words, max_jitter)


def _decode(data: bytes) -> str:
  if data.startswith((b"\xff\xfe", b"\xfe\xff")):
    encodings = ("utf-16",)
  else:
    # Hand-made SRT files are often Windows-1252; UTF-8 is tried first since it is strict.
    encodings = ("utf-8-sig", "cp1252")
  for encoding in encodings:
    try:
      return data.decode(encoding)
    except UnicodeDecodeError:
      pass
  raise TranscriptError("transcript_unreadable", f"not text in {' or '.join(encodings)}")


def parse_file(path: str, max_jitter: float = DEFAULT_MAX_JITTER) -> list[Word]:
  """Reads and parses a transcript file (local or any tf.io.gfile path).

  Args:
    path: a .vtt, .srt or .json file (other extensions: format guessed from the content).
    max_jitter: see `parse_string`.

  Returns:
    Words sorted by start time.

  Raises:
    TranscriptError: unreadable, empty, malformed or unordered input.
  """
  return read_transcript(path, max_jitter)[0]


def read_transcript(path: str, max_jitter: float = DEFAULT_MAX_JITTER
                    ) -> tuple[list[Word], str]:
  """`parse_file`, plus which of our speech recognisers made the file.

  Returns:
    (words sorted by start time, `BACKEND:MODEL` from the `asr` key of a Whisper JSON written
    by `data_pipelines.transcribe`, or "" for any other transcript).
  """
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      data = f.read()
  except (OSError, tf.errors.OpError) as e:
    raise TranscriptError("transcript_unreadable", f"{path}: {e}") from None
  text = _decode(data)
  if not text.strip():
    raise TranscriptError("transcript_empty", "empty file")
  fmt = detect_format(path, text)
  words = parse_string(text, fmt, max_jitter)
  made_by = _load_json(text).get("asr") if fmt == "whisper" else None
  return words, str(made_by.get("model", "")) if isinstance(made_by, dict) else ""


def window_words(words: Sequence[Word], start: float, end: float) -> list[Word]:
  """The words that start in [start, end), with times relative to `start`.

  A word belongs to the window its start falls in (the reference assigns words to clips by
  their timestamp the same way); an end past the window is clipped to the window's end.

  Args:
    words: words sorted by start, in source-video seconds.
    start: window start (s).
    end: window end (s).

  Returns:
    The window's words, times in seconds from `start`.
  """
  length = end - start
  return [Word(w.text, w.start - start, min(w.end, end) - start)
          for w in words if start <= w.start < end and length > 0]
