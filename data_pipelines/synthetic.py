"""The built-in demo world: procedurally rendered, narrated videos written as TFRecords.

    python -m data_pipelines.synthetic --output_dir=/tmp/demo --num_videos=2000 \
        --split=train --seed=0 --num_shards=16 [--version=3]

Each video is a dark, textured, static background on which a sequence of events happens, one
after another. In version 2, an event features one large object (radius ~20% of the short side: at 64 px it
covers several 16-px patches, so token keeping rarely hides it) with a colour and a shape (a
combination used once per video) that is on screen only during its own event, while it performs
one action: it appears, disappears, moves left/right/up/down, grows, shrinks or changes colour.
Every event is narrated by one short sentence spoken during it ("the red circle moves left",
"um the blue square gets bigger"), with a little ASR-like noise: filler words, a dropped word,
timing jitter.

Why version 2 suits TVTS: a transcript names what is on screen while it is spoken, so matching
transcripts to time slices is learnable (colour and shape), but the sentences are drawn
independently of their position (no "first", "then", "finally", nothing that refers to another
sentence), so the ORDER of the transcripts can only be read off the video. Colours follow a
random cycle over the 8-colour palette, so any 8 consecutive events (more than the demo's
11-15 s spans hold) have distinct colours, which makes the task learnable by a small model in a
few thousand steps. The action of
each event is stored as a segment label (`segment_labels/starts/ends`), whose recognition needs
motion, for probes and per-clip evaluation.

Version 3 (`version=3`, the demo's default) makes the order a matter of motion. Two objects,
a red one and a blue one, one a circle and one a square (the same cast in every video), stay
on screen for the whole video and act one after another: each
event, one of them (drawn at random) appears, disappears, moves left/right/up/down, grows or
shrinks while the other one stands still, and the sentence names the actor and its action ("the
red circle moves left"). What is on screen tells neither videos nor time slices apart: a
transcript's clip is the one where its object performs its action, and the
eight actions come in pairs that differ only in the direction of time (left/right, up/down,
grow/shrink, appear/disappear), so a single frame cannot tell them apart. Each object takes its
actions from its own random cycle over the eight, so an object never repeats an action within
eight of its events; the sequence of sentences is then a uniformly random order, and the order
of a span's transcripts again can only be read off the video. An actor takes its action's start
pose (position, size) at its event's start and keeps the end pose until it acts again. Version 2
stays available (`version=2`) and gives the same bytes as before.

Everything is a pure function of (seed, split, video index): `generate` gives the same bytes for
the same arguments, whatever the number of shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import uuid
import zlib
from typing import Any, Sequence

import numpy as np
from PIL import Image
import tensorflow as tf

from data_pipelines import records
from data_pipelines import tokenizer

GENERATOR_VERSION = 3  # what `generate` and the demo write unless told otherwise
GENERATOR_VERSIONS = (2, 3)
DEMO_SEED = 0  # the demo world is the same whatever config.seed (which drives sampling, init)
DEMO_FPS = 4.0
DEMO_ASPECT = 1.25  # width / height of the stored frames
_DEMO_MARKER = "demo_options.json"  # written last into a complete demo set

COLOURS = {  # bright colours on a dark background
    "red": (225, 40, 40), "green": (40, 200, 60), "blue": (60, 100, 240),
    "yellow": (240, 225, 40), "purple": (160, 60, 210), "orange": (250, 140, 30),
    "white": (240, 240, 240), "cyan": (40, 215, 225),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")

# Action names (the label classes, by index) and the phrases that narrate them. The content
# words differ between actions, so a phrase names exactly one action.
ACTIONS = ("appear", "disappear", "move left", "move right", "move up", "move down",
           "grow", "shrink", "change colour")
PHRASES = {
    "appear": ("appears", "emerges", "comes into view"),
    "disappear": ("disappears", "vanishes", "fades out"),
    "move left": ("moves left", "slides left", "goes left"),
    "move right": ("moves right", "slides right", "goes right"),
    "move up": ("moves up", "slides up", "goes up"),
    "move down": ("moves down", "slides down", "goes down"),
    "grow": ("grows", "gets bigger", "expands"),
    "shrink": ("shrinks", "gets smaller", "contracts"),
    "change colour": ("turns {}", "becomes {}", "changes to {}"),
}
# Said at the start of some sentences, independently of the position: not order cues.
PREFIXES = ("now", "look", "okay", "here", "see")
FILLERS = ("um", "uh")

# Event timing (seconds) and ASR noise.
EVENT_SECONDS = (2.5, 3.5)
PAUSE_SECONDS = (0.1, 0.5)
PREFIX_PROB = 0.3
FILLER_PROB = 0.25
DROP_PROB = 0.1
TIME_JITTER = 0.03
# Fraction of an appear/disappear/colour-change event at which the change happens.
SWITCH_AT = {"appear": 0.25, "disappear": 0.75, "change colour": 0.5}

# Version 3: the action classes (label indices; four pairs reversed in time) and the geometry.
ACTIONS_V3 = ("appear", "disappear", "move left", "move right", "move up", "move down",
              "grow", "shrink")
# The same cast in every video (which object gets which shape is drawn per video): which
# objects are on screen tells neither videos nor time slices apart, so matching a video to its
# narration, like ordering it, needs the actions. With a distinct cast per video (8 colours x
# 5 shapes, or 4 x 2) the contrastive loss matched videos by appearance alone and the sorter
# stayed at chance through the demo's budget: it needs motion features to start from.
V3_OBJECTS = 2
V3_COLOURS = ("red", "blue")
V3_SHAPES = ("circle", "square")
V3_RADIUS = (0.13, 0.17)     # resting radius, fraction of the short side
V3_SIZE_RANGE = (0.08, 0.25)  # grow: from the first to the second; shrink: the reverse
V3_TRAVEL = 0.42             # a move's length, fraction of the short side
V3_BOX = (0.18, 0.82)        # where centres live, in the central square


def _event_plan(rng: np.random.Generator, events_per_video: tuple[int, int]) -> dict[str, Any]:
  """Draws what happens and what is said in one video (no pixels yet)."""
  n = int(rng.integers(events_per_video[0], events_per_video[1] + 1))
  colour_names = list(COLOURS)
  # A random cycle over the palette: any len(COLOURS) consecutive events have distinct colours.
  cycle = rng.permutation(len(colour_names))
  events, used = [], set()
  t = float(rng.uniform(0.3, 1.0))
  for i in range(n):
    colour = colour_names[cycle[i % len(cycle)]]
    shape = str(rng.choice([s for s in SHAPES if (colour, s) not in used]))
    used.add((colour, shape))
    action = ACTIONS[int(rng.integers(len(ACTIONS)))]
    new_colour = None
    if action == "change colour":
      new_colour = str(rng.choice([c for c in colour_names
                                   if c != colour and (c, shape) not in used]))
    duration = float(rng.uniform(*EVENT_SECONDS))
    events.append(dict(colour=colour, shape=shape, action=action, new_colour=new_colour,
                       start=t, end=t + duration))
    t += duration + float(rng.uniform(*PAUSE_SECONDS))
  duration = events[-1]["end"] + float(rng.uniform(0.5, 1.0))
  for e in events:
    e["words"], e["word_starts"], e["word_ends"] = _narrate(rng, e)
  return dict(events=events, duration=duration)


def _narrate(rng: np.random.Generator, event: dict[str, Any]):
  """One sentence for one event, with ASR-like noise; returns (words, starts, ends)."""
  phrase = str(rng.choice(PHRASES[event["action"]]))
  if event["new_colour"]:
    phrase = phrase.format(event["new_colour"])
  words = ["the", event["colour"], event["shape"]] + phrase.split()
  if rng.random() < PREFIX_PROB:
    words.insert(0, str(rng.choice(PREFIXES)))
  if rng.random() < DROP_PROB:
    del words[int(rng.integers(len(words)))]
  if rng.random() < FILLER_PROB:
    words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(FILLERS)))
  lengths = np.array([0.16 + 0.035 * len(w) for w in words]) * rng.uniform(0.85, 1.15,
                                                                           len(words))
  pauses = rng.uniform(0.02, 0.1, len(words))
  t = event["start"] + float(rng.uniform(0.05, 0.35))
  # A fast talker for a long sentence: it ends within its event, so no word is heard over the
  # next event (which would make the narration disagree with the segment labels).
  room = event["end"] - 0.1 - t
  scale = min(1.0, room / float(lengths.sum() + pauses.sum()))
  starts, ends = [], []
  for length, pause in zip(lengths * scale, pauses * scale):
    start = t + float(rng.normal(0.0, TIME_JITTER))
    start = min(max(start, starts[-1] + 0.01 if starts else 0.0), event["end"] - 0.05)
    starts.append(start)
    ends.append(min(start + length, event["end"]))
    t += length + pause
  return words, starts, ends


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Mask of a unit-radius shape at offsets (u, v) from its centre (y grows downwards)."""
  if shape == "circle":
    return u * u + v * v <= 1.0
  if shape == "square":
    return np.maximum(np.abs(u), np.abs(v)) <= 0.85
  if shape == "diamond":
    return np.abs(u) + np.abs(v) <= 1.15
  if shape == "triangle":  # apex up
    return (v <= 0.8) & (np.abs(u) <= (v + 1.0) / 1.8)
  if shape == "cross":
    return (((np.abs(u) <= 0.33) & (np.abs(v) <= 1.0)) |
            ((np.abs(v) <= 0.33) & (np.abs(u) <= 1.0)))
  raise ValueError(f"unknown shape {shape!r}")


def _trajectory(rng: np.random.Generator, event: dict[str, Any], frac: np.ndarray):
  """Centre (x, y) in [0, 1] of the central square, radius (fraction of the short side),
  colour and visibility of the event's object at fractions `frac` of the event."""
  action = event["action"]
  n = len(frac)
  radius = np.full(n, rng.uniform(0.17, 0.22))
  x = np.full(n, rng.uniform(0.3, 0.7))
  y = np.full(n, rng.uniform(0.3, 0.7))
  travel = 0.36
  if action.startswith("move "):
    direction = action.split()[1]
    lo, hi = 0.25, 0.75
    along = rng.uniform(lo + travel, hi) if direction in ("left", "up") else rng.uniform(
        lo, hi - travel)
    sign = -1.0 if direction in ("left", "up") else 1.0
    path = along + sign * travel * frac
    if direction in ("left", "right"):
      x = path
    else:
      y = path
  elif action == "grow":
    radius = 0.11 + 0.17 * frac
  elif action == "shrink":
    radius = 0.28 - 0.17 * frac
  colour = np.tile(np.array(COLOURS[event["colour"]], np.uint8), (n, 1))
  visible = np.ones(n, bool)
  switch = SWITCH_AT.get(action)
  if action == "appear":
    visible = frac >= switch
  elif action == "disappear":
    visible = frac < switch
  elif action == "change colour":
    colour[frac >= switch] = COLOURS[event["new_colour"]]
  return x, y, radius, colour, visible


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A dark tinted background with smooth blotches and a little grain (static)."""
  base = rng.uniform(15, 75, size=3)
  coarse = rng.normal(0.0, 12.0, size=(4, 5, 3))
  # Bilinear upsampling of the coarse grid: blotches without edges on the patch grid.
  ys = np.linspace(0, 3, height)
  xs = np.linspace(0, 4, width)
  y0, x0 = np.minimum(ys.astype(int), 2), np.minimum(xs.astype(int), 3)
  wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
  top = coarse[y0][:, x0] * (1 - wx) + coarse[y0][:, x0 + 1] * wx
  bottom = coarse[y0 + 1][:, x0] * (1 - wx) + coarse[y0 + 1][:, x0 + 1] * wx
  grain = rng.normal(0.0, 2.0, size=(height, width, 3))
  return np.clip(base + top * (1 - wy) + bottom * wy + grain, 0, 255).astype(np.uint8)


def _frame_times(duration: float, fps: float) -> np.ndarray:
  """The times of a video's stored frames: every 1/fps from 0, up to its duration."""
  times = np.arange(int(np.floor(duration * fps)) + 1) / fps
  return times[times <= duration]


def _stamp(frame: np.ndarray, shape: str, colour, cx: float, cy: float, r: float,
           xx: np.ndarray, yy: np.ndarray) -> None:
  """Paints a shape of radius r (pixels) centred at (cx, cy) into frame, in place."""
  frame[_shape_mask(shape, (xx - cx) / r, (yy - cy) / r)] = colour


def _render(rng: np.random.Generator, plan: dict[str, Any], height: int, width: int,
            fps: float) -> tuple[np.ndarray, np.ndarray]:
  """Renders all frames of a planned video; returns (frames uint8 [N,H,W,3], times [N])."""
  times = _frame_times(plan["duration"], fps)
  frames = np.broadcast_to(_background(rng, height, width),
                           (len(times), height, width, 3)).copy()
  short = min(height, width)
  # Positions live in the central square of the frame, so that any crop of the short side
  # keeps most of the action in view.
  x_off, y_off = (width - short) / 2, (height - short) / 2
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  for e in plan["events"]:
    sel = np.nonzero((times >= e["start"]) & (times < e["end"]))[0]
    frac = (times[sel] - e["start"]) / (e["end"] - e["start"])
    x, y, radius, colour, visible = _trajectory(rng, e, frac)
    for i, f in enumerate(sel):
      if not visible[i]:
        continue
      _stamp(frames[f], e["shape"], colour[i], x_off + x[i] * short, y_off + y[i] * short,
             radius[i] * short, xx, yy)
  return frames, times


def _event_plan_v3(rng: np.random.Generator, events_per_video: tuple[int, int]) -> dict[str, Any]:
  """Version 3: two persistent objects act one after another (no pixels yet)."""
  n = int(rng.integers(events_per_video[0], events_per_video[1] + 1))
  colours = rng.choice(list(V3_COLOURS), V3_OBJECTS, replace=False)
  shapes = rng.choice(list(V3_SHAPES), V3_OBJECTS, replace=False)
  cycles = [rng.permutation(len(ACTIONS_V3)) for _ in range(V3_OBJECTS)]
  done = [0] * V3_OBJECTS
  objects = [dict(colour=str(c), shape=str(sh), x=float(rng.uniform(*V3_BOX)),
                  y=float(rng.uniform(*V3_BOX)), radius=float(rng.uniform(*V3_RADIUS)))
             for c, sh in zip(colours, shapes)]
  events = []
  t = float(rng.uniform(0.3, 1.0))
  for _ in range(n):
    actor = int(rng.integers(V3_OBJECTS))
    action = ACTIONS_V3[int(cycles[actor][done[actor] % len(ACTIONS_V3)])]
    done[actor] += 1
    duration = float(rng.uniform(*EVENT_SECONDS))
    events.append(dict(actor=actor, colour=objects[actor]["colour"],
                       shape=objects[actor]["shape"], action=action, new_colour=None,
                       start=t, end=t + duration))
    t += duration + float(rng.uniform(*PAUSE_SECONDS))
  duration = events[-1]["end"] + float(rng.uniform(0.5, 1.0))
  for e in events:
    e["words"], e["word_starts"], e["word_ends"] = _narrate(rng, e)
  return dict(events=events, duration=duration, objects=objects)


def _pose_path_v3(rng: np.random.Generator, action: str, pose: dict[str, float],
                  frac: np.ndarray):
  """(x, y, radius, visible) of an actor at fractions `frac` of its event, from `pose`."""
  n = len(frac)
  x, y = np.full(n, pose["x"]), np.full(n, pose["y"])
  radius = np.full(n, pose["radius"])
  visible = np.ones(n, bool)
  lo, hi = V3_BOX
  if action.startswith("move "):
    direction = action.split()[1]
    sign = -1.0 if direction in ("left", "up") else 1.0
    start = (rng.uniform(lo + V3_TRAVEL, hi) if sign < 0 else rng.uniform(lo, hi - V3_TRAVEL))
    path = start + sign * V3_TRAVEL * frac
    if direction in ("left", "right"):
      x = path
    else:
      y = path
  elif action in ("grow", "shrink"):
    small, big = V3_SIZE_RANGE
    radius = small + (big - small) * (frac if action == "grow" else 1.0 - frac)
  elif action == "appear":
    visible = frac >= SWITCH_AT["appear"]
  elif action == "disappear":
    visible = frac < SWITCH_AT["disappear"]
  return x, y, radius, visible


def _render_v3(rng: np.random.Generator, plan: dict[str, Any], height: int, width: int,
               fps: float) -> tuple[np.ndarray, np.ndarray]:
  """Renders a version-3 video: every object on every frame, posed by the events so far."""
  times = _frame_times(plan["duration"], fps)
  n = len(times)
  k = len(plan["objects"])
  x = np.array([[o["x"]] * n for o in plan["objects"]])
  y = np.array([[o["y"]] * n for o in plan["objects"]])
  radius = np.array([[o["radius"]] * n for o in plan["objects"]])
  visible = np.ones((k, n), bool)
  actor_at = np.full(n, -1)  # who acts on each frame (drawn last, on top); -1: nobody
  for e in plan["events"]:
    a = e["actor"]
    sel = np.nonzero((times >= e["start"]) & (times < e["end"]))[0]  # >= 10 frames at 4 fps
    actor_at[sel] = a
    frac = (times[sel] - e["start"]) / (e["end"] - e["start"])
    pose = dict(x=x[a, sel[0]], y=y[a, sel[0]], radius=radius[a, sel[0]])
    px, py, pr, pv = _pose_path_v3(rng, e["action"], pose, frac)
    x[a, sel], y[a, sel], radius[a, sel], visible[a, sel] = px, py, pr, pv
    after = times >= e["end"]  # the end pose holds until the object acts again
    x[a, after], y[a, after], radius[a, after] = px[-1], py[-1], pr[-1]
  frames = np.broadcast_to(_background(rng, height, width), (n, height, width, 3)).copy()
  short = min(height, width)
  x_off, y_off = (width - short) / 2, (height - short) / 2
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  for f in range(n):
    draw = [o for o in range(k) if o != actor_at[f]] + ([actor_at[f]] if actor_at[f] >= 0 else [])
    for o in draw:
      if not visible[o, f]:
        continue
      obj = plan["objects"][o]
      _stamp(frames[f], obj["shape"], COLOURS[obj["colour"]], x_off + x[o, f] * short,
             y_off + y[o, f] * short, radius[o, f] * short, xx, yy)
  return frames, times


def _encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def _split_code(split: str) -> int:
  return zlib.crc32(split.encode())


def make_video(seed: int, split: str, index: int, *, short_side: int = 64,
               fps: float = DEMO_FPS, aspect: float = DEMO_ASPECT,
               events_per_video: tuple[int, int] = (8, 11),
               jpeg_quality: int = 90,
               version: int = GENERATOR_VERSION) -> records.VideoRecord:
  """Plans, renders and narrates one video; a pure function of its arguments.

  Args:
    seed: the world's seed.
    split: split name; different splits get different videos.
    index: video index within the split.
    short_side: stored frame height (the short side); width = round(short_side * aspect).
    fps: rate the frames are stored at.
    aspect: width / height (>= 1).
    events_per_video: inclusive range of the number of events (each 2.5-3.5 s).
    jpeg_quality: JPEG quality of the stored frames.
    version: the world (GENERATOR_VERSIONS; see the module docstring).

  Returns:
    The record, with one segment (label = action index of the version's classes) per event.
  """
  _check_version(version)
  rng = np.random.default_rng([seed, _split_code(split), index])
  height, width = int(short_side), int(round(short_side * aspect))
  if version == 2:
    plan = _event_plan(rng, events_per_video)
    frames, times = _render(rng, plan, height, width, fps)
  else:
    plan = _event_plan_v3(rng, events_per_video)
    frames, times = _render_v3(rng, plan, height, width, fps)
  actions = action_names(version)
  ev = plan["events"]
  return records.VideoRecord(
      video_id=f"synthetic-{split}-{index:06d}",
      source=f"synthetic://seed={seed}/{split}/{index}",
      duration=plan["duration"], fps=fps, height=height, width=width,
      frames=[_encode_jpeg(f, jpeg_quality) for f in frames],
      frame_times=times.tolist(),
      words=[w for e in ev for w in e["words"]],
      word_starts=[t for e in ev for t in e["word_starts"]],
      word_ends=[t for e in ev for t in e["word_ends"]],
      label=-1,
      segment_labels=[actions.index(e["action"]) for e in ev],
      segment_starts=[e["start"] for e in ev],
      segment_ends=[e["end"] for e in ev])


def _check_version(version: int) -> None:
  if version not in GENERATOR_VERSIONS:
    raise ValueError(f"synthetic world version={version!r}; must be one of {GENERATOR_VERSIONS}")


def action_names(version: int = GENERATOR_VERSION) -> tuple[str, ...]:
  """The action (label) classes of a world version, by index."""
  _check_version(version)
  return ACTIONS if version == 2 else ACTIONS_V3


def world_description(version: int = GENERATOR_VERSION) -> dict[str, Any]:
  """The label classes and vocabulary of the demo world (stored in dataset_info.json)."""
  actions = action_names(version)
  return dict(num_action_labels=len(actions), action_names=list(actions),
              colours=list(COLOURS), shapes=list(SHAPES))


def _write_split(output_dir: str, num_videos: int, seed: int, split: str, num_shards: int,
                 name: str, verbose: bool, **video_kwargs) -> tuple[dict[str, Any], list[str]]:
  """Writes one split's shards; returns (split info, per-video transcripts)."""
  if num_videos < 1:
    raise ValueError(f"num_videos={num_videos} must be positive")
  num_shards = max(1, min(num_shards, num_videos))
  tf.io.gfile.makedirs(output_dir)
  names = [records.shard_name(name, split, i, num_shards) for i in range(num_shards)]
  writers = [tf.io.TFRecordWriter(os.path.join(output_dir, n)) for n in names]
  counts = [0] * num_shards
  transcripts = []
  t0 = time.time()
  report_every = max(1, num_videos // 10)
  try:
    for i in range(num_videos):
      record = make_video(seed, split, i, **video_kwargs)
      writers[i % num_shards].write(records.serialize(record))
      counts[i % num_shards] += 1
      transcripts.append(" ".join(record.words))
      if verbose and ((i + 1) % report_every == 0 or i + 1 == num_videos):
        print(f"synthetic {split}: {i + 1}/{num_videos} videos ({time.time() - t0:.1f} s)",
              flush=True)
  finally:
    for w in writers:
      w.close()
  info = dict(split=split, num_records=num_videos, num_shards=num_shards,
              shard_counts=dict(zip(names, counts)))
  return info, transcripts


def generate(output_dir: str, num_videos: int, seed: int = 0, split: str = "train",
             num_shards: int = 8, *, short_side: int = 64, fps: float = DEMO_FPS,
             aspect: float = DEMO_ASPECT, events_per_video: tuple[int, int] = (8, 11),
             jpeg_quality: int = 90, name: str = "synthetic",
             version: int = GENERATOR_VERSION, verbose: bool = True) -> dict[str, Any]:
  """Writes `num_videos` synthetic videos of one split as TFRecord shards + dataset_info.json.

  Video i goes to shard i % num_shards. `dataset_info.json` holds the generator options, the
  label names and, per split, the record count of each shard; `shard_counts` (file name ->
  records) at its top level collects all splits written to the directory (the input pipeline
  reads it to position a resumed stream without reading the files).

  Args:
    output_dir: directory for the shards (created).
    num_videos: number of videos.
    seed: the world's seed.
    split: split name, part of the file names and of each video's seed.
    num_shards: number of shards (at most num_videos).
    short_side: stored frame height, i.e. the short side (set it to config.data.resize_short).
    fps: rate the frames are stored at.
    aspect: width / height of the frames.
    events_per_video: inclusive range of the number of events per video (each 2.5-3.5 s).
    jpeg_quality: JPEG quality.
    name: dataset name, the prefix of the shard names.
    version: the world (GENERATOR_VERSIONS).
    verbose: print progress.

  Returns:
    The dataset info as written (all splits in the directory).
  """
  _check_version(version)
  options = dict(generator="synthetic", generator_version=version, seed=seed,
                 short_side=short_side, fps=fps, aspect=aspect,
                 events_per_video=list(events_per_video), jpeg_quality=jpeg_quality)
  split_info, _ = _write_split(output_dir, num_videos, seed, split, num_shards, name, verbose,
                               short_side=short_side, fps=fps, aspect=aspect,
                               events_per_video=tuple(events_per_video),
                               jpeg_quality=jpeg_quality, version=version)
  return _update_info(output_dir, name, options, split_info)


def _update_info(output_dir: str, name: str, options: dict[str, Any],
                 split_info: dict[str, Any]) -> dict[str, Any]:
  """Adds one split to the directory's dataset_info.json (same generator options only)."""
  info = dict(name=name, options=options, splits={}, shard_counts={},
              **world_description(options["generator_version"]))
  if tf.io.gfile.exists(os.path.join(output_dir, records.INFO_FILE)):
    old = records.read_info(output_dir)
    if old.get("options") == options and old.get("name") == name:
      info["splits"].update(old.get("splits", {}))
  info["splits"][split_info["split"]] = split_info
  for s in info["splits"].values():
    info["shard_counts"].update(s["shard_counts"])
  records.write_info(output_dir, info)
  return records.read_info(output_dir)


def _demo_options(config) -> dict[str, Any]:
  version = int(config.demo.generator_version)
  _check_version(version)
  return dict(generator_version=version, seed=DEMO_SEED,
              num_train_videos=int(config.demo.num_train_videos),
              num_eval_videos=int(config.demo.num_eval_videos),
              vocab_size=int(config.demo.vocab_size),
              short_side=int(config.data.resize_short), fps=DEMO_FPS, aspect=DEMO_ASPECT)


def _demo_paths(root: str) -> dict[str, str]:
  return dict(train=os.path.join(root, "demo-train.tfrecord-*"),
              eval=os.path.join(root, "demo-eval.tfrecord-*"),
              tokenizer=os.path.join(root, "spm.model"))


def ensure_demo_data(config, directory: str, verbose: bool = True) -> dict[str, str]:
  """Generates the demo data and its tokenizer once; later calls with the same options reuse it.

  The data goes to `directory/demo-<hash of the options>/`; it is written under a temporary
  name and renamed when complete, so a crash never leaves a half-written set that looks
  complete (a stale `.tmp-*` folder may stay behind and can be deleted).

  Args:
    config: the run config (reads data.resize_short and demo.*).
    directory: where demo data sets live (e.g. WORKDIR/data).
    verbose: print progress.

  Returns:
    dict(train=GLOB, eval=GLOB, tokenizer=PATH).
  """
  options = _demo_options(config)
  digest = hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:10]
  final = os.path.join(directory, f"demo-{digest}")
  if _is_complete(final, options):
    if verbose:
      print(f"demo data: reusing {final}", flush=True)
    return _demo_paths(final)

  tmp = os.path.join(directory, f".tmp-demo-{digest}-{uuid.uuid4().hex[:8]}")
  tf.io.gfile.makedirs(tmp)
  if verbose:
    print(f"demo data: generating {options['num_train_videos']} train and "
          f"{options['num_eval_videos']} eval videos into {final}", flush=True)
  kwargs = dict(short_side=options["short_side"], fps=options["fps"],
                aspect=options["aspect"], events_per_video=(8, 11), jpeg_quality=90,
                version=options["generator_version"])
  train_info, transcripts = _write_split(tmp, options["num_train_videos"], DEMO_SEED, "train",
                                         16, "demo", verbose, **kwargs)
  eval_info, _ = _write_split(tmp, options["num_eval_videos"], DEMO_SEED, "eval", 8, "demo",
                              verbose, **kwargs)
  gen_options = dict(generator="synthetic", generator_version=kwargs.pop("version"),
                     seed=DEMO_SEED, **{k: list(v) if isinstance(v, tuple) else v
                                        for k, v in kwargs.items()})
  _update_info(tmp, "demo", gen_options, train_info)
  _update_info(tmp, "demo", gen_options, eval_info)
  paths = _demo_paths(tmp)
  tokenizer.train(transcripts, options["vocab_size"], paths["tokenizer"])
  if verbose:
    print(f"demo data: tokenizer with {tokenizer.load(paths['tokenizer']).vocab_size} "
          "pieces", flush=True)
  # Written last: its presence (with these options) is what marks the set as complete.
  with tf.io.gfile.GFile(os.path.join(tmp, _DEMO_MARKER), "w") as f:
    json.dump(options, f, sort_keys=True)
  try:
    tf.io.gfile.rename(tmp, final)
  except tf.errors.OpError:
    # Another process finished the same set first (or a stale, incomplete one is in the way).
    if not _is_complete(final, options):
      raise
    tf.io.gfile.rmtree(tmp)
  return _demo_paths(final)


def _is_complete(root: str, options: dict[str, Any]) -> bool:
  marker = os.path.join(root, _DEMO_MARKER)
  if not tf.io.gfile.exists(marker):
    return False
  with tf.io.gfile.GFile(marker) as f:
    return json.load(f) == options


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # TF only writes records here; leave GPUs alone
  f = flags.FLAGS
  info = generate(f.output_dir, f.num_videos, seed=f.seed, split=f.split,
                  num_shards=f.num_shards, short_side=f.short_side, fps=f.fps,
                  aspect=f.aspect, version=f.version)
  print(json.dumps(dict(output_dir=f.output_dir, split=f.split,
                        num_records=info["splits"][f.split]["num_records"],
                        num_shards=info["splits"][f.split]["num_shards"])))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  flags.DEFINE_string("output_dir", None, "where to write the shards", required=True)
  flags.DEFINE_integer("num_videos", None, "number of videos", required=True)
  flags.DEFINE_string("split", "train", "split name")
  flags.DEFINE_integer("seed", 0, "the world's seed")
  flags.DEFINE_integer("num_shards", 8, "number of shards")
  flags.DEFINE_integer("short_side", 64, "stored frame height (= config.data.resize_short)")
  flags.DEFINE_float("fps", DEMO_FPS, "stored frame rate")
  flags.DEFINE_float("aspect", DEMO_ASPECT, "width / height")
  flags.DEFINE_integer("version", GENERATOR_VERSION, "the world: 3 (order needs motion) or 2")
  app.run(main)
