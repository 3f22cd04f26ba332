"""Zero-shot evaluation through the text tower: action classification and caption retrieval.

The protocols TVTSv2 reports, on the frozen model, with the evaluation view of every
frozen-encoder protocol here (`data.num_frames` frames at the middles of equal bins, the short
side resized, a centre crop, every patch kept: tvts_jax/labelled.py):

- `zero_shot_classification`: each class name goes through a prompt template (default
  `'a person {}'`, TVTSv2's), is embedded by the text tower as one query (L2-normalised), and
  each video's contrastive embedding is scored against every class: logits = 100 x cosine;
  top-1 and top-5. The class names come from the option, or from the `dataset_info.json` beside
  the records (`class_names` of `prepare --labels=...`, or the demo world's action names).
- `caption_retrieval`: on a labelled set whose records carry a caption each (`prepare
  --labels=csv --manifest=...` with a `caption` column, MSR-VTT style), text-to-video and
  video-to-text retrieval: R@1/5/10 and the median rank of the right video (or caption).
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np

from tvts_jax import config_schema, sharding
from tvts_jax.evaluators import common
from tvts_jax.evaluators.probe import topk_accuracy
from tvts_jax.evaluators.retrieval import text_to_video_metrics


def class_names_of(records: str) -> list[str]:
  """The class names in `dataset_info.json` beside a record set, in label order."""
  from data_pipelines import records as records_lib  # pylint: disable=g-import-not-at-top
  from tvts_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  directory = os.path.dirname(input_pipeline.list_files(records)[0])
  try:
    info = records_lib.read_info(directory)
  except Exception as e:  # pylint: disable=broad-except  # a missing or unreadable file: say so
    raise common.SkipEvaluation(f"no class names: {directory} has no readable dataset_info.json "
                                f"({type(e).__name__}); set the class_names option") from e
  names = info.get("class_names") or info.get("action_names")
  if not names:
    raise common.SkipEvaluation(f"no class names in {directory}/dataset_info.json (a set "
                                "labelled with integers has none): set the class_names option")
  return list(names)


class ZeroShotClassification(common.Evaluator):
  """Classification by the similarity of each video to a prompt of each class name."""
  SUMMARY = ("top1", "chance_top1")
  OPTIONS = {
      "records": ("", "labelled records (prepare --labels=...); empty: the demo's eval split"),
      "prompt": ("a person {}", "the template each class name is put in"),
      "class_names": ((), "class names in label order; empty: the records' dataset_info.json"),
      "max_examples": (0, "use only the first this many labelled examples (0: all)"),
  }

  @classmethod
  def check(cls, name, options) -> None:
    if "{}" not in options.prompt:
      raise config_schema.ConfigError(f"evals.{name}.prompt={options.prompt!r} needs a '{{}}' "
                                      "for the class name")

  def run(self, params: Any) -> Iterator[tuple[str, Any]]:
    o, fns = self.options, self.ctx.fns
    fns.require_full_model(params)
    records = self.records("records", self.ctx.data.labelled_test)
    names = list(o.class_names) or class_names_of(records)
    ids, mask = self.tokenize([o.prompt.format(n) for n in names])
    classes = fns.text_embedding(params, ids, mask)  # L2-normalised [C, E]
    cls, labels = self.labelled_features(params, records, o.max_examples)
    if labels.max() >= len(names):
      raise common.SkipEvaluation(f"labels up to {labels.max()} but {len(names)} class names")
    videos = fns.video_embedding(params, cls)
    logits = 100.0 * videos @ classes.T
    counts = np.bincount(labels, minlength=len(names))
    yield "top1", topk_accuracy(logits, labels, 1)
    yield "top5", topk_accuracy(logits, labels, 5)
    yield "num_classes", float(len(names))
    yield "num_examples", float(len(labels))
    yield "chance_top1", float(counts.max() / len(labels))


class CaptionRetrieval(common.Evaluator):
  """Text-to-video and video-to-text retrieval with one caption per video."""
  SUMMARY = ("t2v/R@1", "v2t/R@1")
  OPTIONS = {
      "records": ("", "labelled records with a caption each (a manifest's caption column)"),
      "max_examples": (0, "use only the first this many examples (0: all)"),
  }

  def run(self, params: Any) -> Iterator[tuple[str, Any]]:
    fns = self.ctx.fns
    fns.require_full_model(params)
    records = self.records("records", self.ctx.data.labelled_test)
    videos, texts = [], []
    for batch in self.labelled_batches(records, self.options.max_examples, captions=True):
      keep = sharding.to_host(batch["valid"]) & sharding.to_host(batch["has_caption"])
      if not keep.any():
        continue
      videos.append(fns.video_embedding(params, fns.video_features(params, batch))[keep])
      texts.append(fns.text_embedding(params, batch["caption_ids"],
                                      batch["caption_mask"])[keep])
    if not videos or sum(len(v) for v in videos) < 2:
      raise common.SkipEvaluation(f"fewer than 2 records of {records} carry a caption "
                                  "(prepare --labels=csv with a caption column)")
    videos, texts = np.concatenate(videos), np.concatenate(texts)
    for name, (queries, gallery) in (("t2v", (texts, videos)), ("v2t", (videos, texts))):
      for key, value in text_to_video_metrics(queries, gallery).items():
        yield f"{name}/{key}", value
