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
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import jax.numpy as jnp
import numpy as np

from tvts_jax import losses
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
  }

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
