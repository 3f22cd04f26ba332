"""The linear probe on the frozen video encoder.

Each labelled example is read TSN-style (`data.num_frames` equal segments over the example, the
middle frame of each; the short side resized to `data.resize_short`, a centre
`data.image_size` crop), every patch kept, and embedded as the CLS token of the video tower's
output. Features are standardised with the train split's statistics; a softmax classifier
(full-batch optax L-BFGS, at most `steps` iterations) is trained for each L2 penalty of
`weight_decays` on all but a held-out `holdout_fraction` of the train split, the best on the
held-out part is retrained on the whole train split, and top-1 / top-5 are measured on the
test split, beside `chance_top1` (the test set's majority-class rate).

Labelled examples: a record with a class label (`label >= 0`, written by
`prepare --labels=folders|csv`) is one example spanning the whole record; a record without one
gives one example per annotated action segment (`segment_labels/starts/ends`). The demo data is
of the second kind: its events' actions are the labels.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tvts_jax import config_schema
from tvts_jax.evaluators import common


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Fraction of rows whose label is among the k highest logits (k capped at the classes)."""
  k = min(k, logits.shape[1])
  top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
  return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=1)))


@functools.partial(jax.jit, static_argnames=("num_classes", "max_steps"))
def _fit_linear(x, y, weight_decay, tol, *, num_classes: int, max_steps: int):
  """Softmax regression with an L2 penalty by full-batch L-BFGS; returns (w, b, steps)."""
  params = {"w": jnp.zeros((x.shape[1], num_classes), jnp.float32),
            "b": jnp.zeros((num_classes,), jnp.float32)}

  def loss_fn(p):
    logits = x @ p["w"] + p["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + 0.5 * weight_decay * jnp.sum(p["w"] ** 2)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss_fn)

  def step(carry):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss_fn)
    return optax.apply_updates(p, updates), state

  def going(carry):
    _, state = carry
    count = optax.tree_utils.tree_get(state, "count")
    err = optax.tree_utils.tree_l2_norm(optax.tree_utils.tree_get(state, "grad"))
    # Stops at convergence, and before a converged L-BFGS divides 0 by 0.
    return (count == 0) | ((count < max_steps) & (err >= tol) & jnp.isfinite(err))

  params, state = jax.lax.while_loop(going, step, (params, opt.init(params)))
  return params["w"], params["b"], optax.tree_utils.tree_get(state, "count")


def train_linear_classifier(x: np.ndarray, y: np.ndarray, num_classes: int, *,
                            weight_decay: float, max_steps: int,
                            tol: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
  """Fits logits = x @ w + b by mean cross-entropy + weight_decay / 2 * ||w||^2.

  Full-batch L-BFGS (a convex problem: it converges in a few hundred steps where Adam needs
  thousands).

  Args:
    x: float [N, D] features (standardised: L-BFGS and the penalty assume comparable scales).
    y: int [N] labels in [0, num_classes).
    num_classes: C.
    weight_decay: L2 penalty coefficient.
    max_steps: L-BFGS iterations at most.
    tol: stop when the gradient's norm falls below this.

  Returns:
    (w [D, C], b [C]) as numpy.

  Raises:
    FloatingPointError: the fit diverged.
  """
  w, b, _ = _fit_linear(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32),
                        jnp.float32(weight_decay), jnp.float32(tol),
                        num_classes=int(num_classes), max_steps=int(max_steps))
  w, b = np.asarray(w), np.asarray(b)
  if not (np.isfinite(w).all() and np.isfinite(b).all()):
    raise FloatingPointError(f"the linear probe diverged (weight_decay={weight_decay})")
  return w, b


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, *, weight_decays: Iterable[float], max_steps: int,
                 holdout_fraction: float, seed: int = 0) -> dict[str, float]:
  """The linear-probe protocol on precomputed features (see the module docstring).

  Args:
    train_x, train_y: train split features [N, D] and int labels [N].
    test_x, test_y: test split.
    weight_decays: L2 penalties to sweep; the first is used when there is no held-out part.
    max_steps: L-BFGS iterations at most per fit (`train_linear_classifier`).
    holdout_fraction: part of the train split held out to choose the penalty.
    seed: the held-out split.

  Returns:
    top1, top5 (test), weight_decay (chosen), holdout_top1@<wd> per swept value, num_train,
    num_test, num_classes and chance_top1 (the test frequency of its most common class).
  """
  train_y, test_y = np.asarray(train_y, np.int64), np.asarray(test_y, np.int64)
  if len(train_x) == 0 or len(test_x) == 0:
    raise ValueError(f"linear probe needs train and test examples, got {len(train_x)} and "
                     f"{len(test_x)}")
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  mean = train_x.mean(axis=0)
  std = train_x.std(axis=0) + 1e-6
  train_x = (np.asarray(train_x, np.float32) - mean) / std
  test_x = (np.asarray(test_x, np.float32) - mean) / std
  fit = functools.partial(train_linear_classifier, num_classes=num_classes,
                          max_steps=max_steps)
  weight_decays = [float(w) for w in weight_decays]
  out: dict[str, float] = {}
  n_hold = int(round(holdout_fraction * len(train_x)))
  best = weight_decays[0]
  if len(weight_decays) > 1 and 0 < n_hold < len(train_x):
    perm = np.random.default_rng(seed).permutation(len(train_x))
    hold, rest = perm[:n_hold], perm[n_hold:]
    scores = []
    for wd in weight_decays:
      w, b = fit(train_x[rest], train_y[rest], weight_decay=wd)
      scores.append(topk_accuracy(train_x[hold] @ w + b, train_y[hold], 1))
      out[f"holdout_top1@{wd:g}"] = scores[-1]
    best = weight_decays[int(np.argmax(scores))]  # the first of equals: the list's order
  w, b = fit(train_x, train_y, weight_decay=best)
  logits = test_x @ w + b
  counts = np.bincount(test_y, minlength=num_classes)
  out.update(top1=topk_accuracy(logits, test_y, 1), top5=topk_accuracy(logits, test_y, 5),
             weight_decay=best, num_train=float(len(train_x)), num_test=float(len(test_x)),
             num_classes=float(num_classes), chance_top1=float(counts.max() / len(test_y)))
  return out


class LinearProbe(common.Evaluator):
  """Linear probe on the frozen CLS features of a labelled train and test split."""
  SUMMARY = ("top1", "chance_top1")
  OPTIONS = {
      "train_records": ("", "labelled records to fit on; empty: the demo's train split"),
      "test_records": ("", "labelled records to test on; empty: the demo's eval split"),
      "max_examples": (0, "use only the first this many examples of each split (0: all)"),
      "weight_decays": ((0.0, 1e-4, 1e-3, 1e-2),
                        "L2 penalties swept on a held-out part of the train split"),
      "holdout_fraction": (0.2, "part of the train split held out to choose the penalty"),
      "steps": (500, "L-BFGS iterations at most (full batch; stops at convergence)"),
  }

  @classmethod
  def check(cls, name, options) -> None:
    if not options.weight_decays or min(options.weight_decays) < 0:
      raise config_schema.ConfigError(
          f"evals.{name}.weight_decays={options.weight_decays} must be non-negative values "
          "(at least one)")
    if not 0.0 <= options.holdout_fraction < 1.0:
      raise config_schema.ConfigError(
          f"evals.{name}.holdout_fraction={options.holdout_fraction} must be in [0, 1)")
    common.check_positive(name, options, "steps")

  def run(self, params: Any) -> Iterator[tuple[str, Any]]:
    o, data = self.options, self.ctx.data
    train = self.records("train_records", data.labelled_train)
    test = self.records("test_records", data.labelled_test)
    train_x, train_y = self.labelled_features(params, train, o.max_examples)
    test_x, test_y = self.labelled_features(params, test, o.max_examples)
    yield from linear_probe(train_x, train_y, test_x, test_y, weight_decays=o.weight_decays,
                            max_steps=o.steps, holdout_fraction=o.holdout_fraction,
                            seed=self.ctx.config.seed).items()
