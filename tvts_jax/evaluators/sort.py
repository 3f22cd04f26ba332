"""Held-out transcript sorting: does the model put unseen transcripts back in order?

On `data.eval_batches` batches of held-out TVTS examples (sampled like training examples, but
every patch kept and each record's clips fixed by its `video_id`, so every evaluation sees the
same clips), the sorter's logits are decoded and compared with the true order:

- `sort_acc`: all K per-transcript argmax predictions right (the reference's metric);
- `sort_acc_perm`, `position_acc`, `position_acc_perm`, `kendall_tau`: the exact
  best-permutation decoding, per-position accuracy, Kendall's tau (`losses.sort_metrics`);
- `sort_loss`: the configured sort loss on these examples;
- `chance_sort_acc` = 1 / K!, and `num_examples`.

With `shuffled_control` the same clips are evaluated again with their frames shuffled in time
(`shuffled_frames/...`): transcripts carry no order cue, so a model that sorts by looking at the
video falls to chance there; one that stays above chance found a cue in the text.

With `images` > 0 it also yields `examples`, a figure (uint8 [H, W, 3], which the trainer
writes to TensorBoard) of that many held-out examples: each clip's frames as a strip, in time
order, with its transcript under it (decoded with the run's tokenizer), and the order the model
predicted beside the true one (`render_examples`).
"""

from __future__ import annotations

import math
import textwrap
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from tvts_jax import config_schema, losses
from tvts_jax.evaluators import common


def sort_results(out: dict[str, np.ndarray], config) -> dict[str, float]:
  """Sort metrics and loss of held-out outputs (`ModelFns.heldout`, valid examples only)."""
  n = len(out["order"])
  if not n:
    raise common.SkipEvaluation("no valid held-out example (no span with words in every clip)")
  logits, order = jnp.asarray(out["sort_logits"]), jnp.asarray(out["order"])
  valid = jnp.ones(n, bool)
  metrics = {k: float(v) for k, v in losses.sort_metrics(logits, order, valid).items()}
  metrics["sort_loss"] = float(losses.SORT_LOSSES[config.sort_loss](logits, order, valid,
                                                                    config))
  metrics["num_examples"] = float(n)
  return metrics


class SortEvaluator(common.Evaluator):
  """Transcript sorting on held-out examples, with the frame-shuffled control."""
  SUMMARY = ("sort_acc", "shuffled_frames/sort_acc", "chance_sort_acc")
  OPTIONS = {
      "records": ("", "held-out TVTS records; empty: data.eval_records (the demo's eval split)"),
      "shuffled_control": (True, "also evaluate with each clip's frames shuffled in time"),
      "images": (3, "held-out examples drawn as the `examples` figure (TensorBoard): frames "
                 "per clip, transcripts, predicted and true order; 0: none"),
  }

  @classmethod
  def check(cls, name, options) -> None:
    if options.images < 0:
      raise config_schema.ConfigError(f"evals.{name}.images={options.images} must be >= 0 "
                                      "(0: no figure)")

  def run(self, params: Any) -> Iterator[tuple[str, Any]]:
    records = self.records("records", self.ctx.data.heldout)
    results = sort_results(self.heldout_outputs(params, records), self.ctx.config)
    k = self.ctx.config.data.num_clips
    yield from results.items()
    yield "chance_sort_acc", 1.0 / math.factorial(k)
    if self.options.shuffled_control:
      shuffled = sort_results(self.heldout_outputs(params, records, shuffled=True),
                              self.ctx.config)
      for key, value in shuffled.items():
        yield f"shuffled_frames/{key}", value
    if self.options.images and jax.process_index() == 0:  # only process 0 writes summaries
      yield "examples", self.figure(params, records)

  def figure(self, params: Any, records: str) -> np.ndarray:
    """The `examples` figure of `params` (uint8 [H, W, 3])."""
    examples = self.heldout_examples(params, records)
    decode = None
    if self.ctx.data.tokenizer:
      from data_pipelines import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
      decode = getattr(tok_lib.load_cached(self.ctx.data.tokenizer), "decode", None)
    return render_examples(examples, int(self.options.images), decode)


def _transcript(ids: np.ndarray, mask: np.ndarray, decode) -> str:
  ids = [int(i) for i in ids[mask.astype(bool)]]
  if decode is not None:
    return decode(ids)
  return "ids " + " ".join(map(str, ids))


def render_examples(examples: dict[str, np.ndarray], n: int, decode=None) -> np.ndarray:
  """A figure of the first `n` held-out examples, as uint8 [H, W, 3].

  One row per example, one panel per clip in time order: the clip's frames side by side, the
  transcript that belongs to it under them, green where the model put that transcript there and
  red where it did not; the row's title gives, per transcript (in the order the sorter saw
  them), its true and its predicted clip.

  Args:
    examples: `Evaluator.heldout_examples`: video uint8 [N, T, H, W, 3], text_ids / text_mask
      [N, K, L], order [N, K], sort_logits [N, K, K].
    n: examples drawn (at most N).
    decode: token ids -> text (the tokenizer's); None: the ids are shown.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  n = min(n, len(examples["order"]))
  if not n:
    raise common.SkipEvaluation("no valid held-out example to draw")
  k = examples["order"].shape[1]
  t = examples["video"].shape[1]
  pred = np.asarray(losses.best_permutation(jnp.asarray(examples["sort_logits"][:n])))
  fig = Figure(figsize=(2.4 * k, 2.1 * n), dpi=72)
  FigureCanvasAgg(fig)
  grid = fig.subplots(n, k, squeeze=False)
  bounds = [round(i * t / k) for i in range(k + 1)]  # the frames of clip j: bounds[j]..
  for row in range(n):
    order, guess = examples["order"][row], pred[row]
    right = int((guess == order).sum())
    grid[row, 0].set_title(f"example {row}: clip of transcripts #0..#{k - 1}: true "
                           f"{order.tolist()}, predicted {guess.tolist()} ({right}/{k} right)",
                           loc="left", fontsize=9)
    for clip in range(k):
      ax = grid[row, clip]
      frames = examples["video"][row, bounds[clip]:max(bounds[clip + 1], bounds[clip] + 1)]
      ax.imshow(np.concatenate(list(frames), axis=1))
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_ylabel(f"clip {clip}", fontsize=8)
      transcript = int(np.argmax(order == clip))  # the transcript of this clip
      text = _transcript(examples["text_ids"][row, transcript],
                         examples["text_mask"][row, transcript], decode)
      ok = guess[transcript] == clip
      ax.set_xlabel("\n".join(textwrap.wrap(f"#{transcript}: {text}", 30)[:3]), fontsize=7,
                    color="green" if ok else "red")
  fig.subplots_adjust(left=0.04, right=0.99, top=1 - 0.3 / n, bottom=0.25 / n, wspace=0.15,
                      hspace=0.9)
  fig.canvas.draw()
  return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()

