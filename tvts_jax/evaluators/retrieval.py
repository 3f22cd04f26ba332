"""Zero-shot retrieval with the frozen encoder: video-to-video, and text-to-video.

- `v2v_retrieval`: the paper's SSv2 protocol. Each labelled video (read TSN-style, every patch
  kept) is embedded as the video tower's CLS token; cosine similarity, the query itself
  excluded; R@K is the fraction of queries with a video of their own class among the K
  nearest.
- `t2v_retrieval`: on the held-out TVTS examples, each example's text embedding (the mean of
  its K transcripts' projections) against all the set's video embeddings; R@1/5/10, median and
  mean rank (rank = 1 + the number of videos scored strictly higher than the right one).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np

from tvts_jax.evaluators import common


def l2_normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def video_retrieval_metrics(features: np.ndarray, labels: np.ndarray,
                            ks: Iterable[int] = (1, 5, 10),
                            chunk: int = 1024) -> dict[str, float]:
  """Zero-shot video-to-video retrieval by cosine similarity, the query excluded.

  Args:
    features: [N, D] video features.
    labels: int [N] class of each video.
    ks: the cut-offs K.
    chunk: queries scored at once (bounds memory at chunk x N).

  Returns:
    {'R@K': fraction of queries with at least one video of their class among the K most
    similar other videos, ..., 'num_queries': N}. Ties are broken by the lower index.
  """
  f = l2_normalize(features)
  labels = np.asarray(labels)
  n = len(f)
  if n < 2:
    raise ValueError(f"video retrieval needs at least 2 videos, got {n}")
  ks = sorted(ks)
  kmax = min(ks[-1], n - 1)
  hits = {k: 0 for k in ks}
  for start in range(0, n, chunk):
    sim = f[start:start + chunk] @ f.T
    rows = np.arange(len(sim))
    sim[rows, start + rows] = -np.inf  # the query itself
    # A stable sort of the negated scores: equal scores keep the lower index first.
    top = np.argsort(-sim, axis=1, kind="stable")[:, :kmax]
    match = labels[top] == labels[start + rows][:, None]
    for k in ks:
      hits[k] += int(np.any(match[:, :k], axis=1).sum())
  return {**{f"R@{k}": hits[k] / n for k in ks}, "num_queries": float(n)}


def text_to_video_metrics(text_emb: np.ndarray, video_emb: np.ndarray,
                          ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
  """Text-to-video retrieval: query i's right answer is video i.

  Args:
    text_emb: [N, E] text embeddings (queries).
    video_emb: [N, E] video embeddings (gallery), row i paired with text i.
    ks: the cut-offs K.

  Returns:
    {'R@K': fraction of queries whose video ranks <= K, 'median_rank', 'mean_rank',
    'num_queries'}; rank = 1 + the number of videos scored strictly higher than the right one.
  """
  sim = l2_normalize(text_emb) @ l2_normalize(video_emb).T
  right = np.diag(sim)
  ranks = 1 + np.sum(sim > right[:, None], axis=1)
  out = {f"R@{k}": float(np.mean(ranks <= k)) for k in ks}
  out.update(median_rank=float(np.median(ranks)), mean_rank=float(np.mean(ranks)),
             num_queries=float(len(ranks)))
  return out


class VideoToVideo(common.Evaluator):
  """Video-to-video retrieval on a labelled set (frozen CLS features, cosine similarity)."""
  SUMMARY = ("R@1", "R@5")
  OPTIONS = {
      "records": ("", "labelled records (prepare --labels=...); empty: the demo's eval split"),
      "max_examples": (0, "use only the first this many labelled examples (0: all)"),
  }

  def run(self, params: Any) -> Iterator[tuple[str, Any]]:
    records = self.records("records", self.ctx.data.labelled_test)
    features, labels = self.labelled_features(params, records, self.options.max_examples)
    yield from video_retrieval_metrics(features, labels).items()


class TextToVideo(common.Evaluator):
  """Text-to-video retrieval on the held-out TVTS examples (their transcripts as queries)."""
  SUMMARY = ("R@1", "median_rank")
  OPTIONS = {
      "records": ("", "held-out TVTS records; empty: data.eval_records (the demo's eval split)"),
  }

  def run(self, params: Any) -> Iterator[tuple[str, Any]]:
    records = self.records("records", self.ctx.data.heldout)
    out = self.heldout_outputs(params, records)
    if len(out["order"]) < 2:
      raise common.SkipEvaluation("fewer than 2 valid held-out examples")
    yield from text_to_video_metrics(out["text_emb"], out["video_emb"]).items()
