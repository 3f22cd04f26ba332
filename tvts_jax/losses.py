"""TVTS losses and sort metrics: pure float32 functions of model outputs.

Every function takes a `valid` bool [B] vector: invalid (padding) examples contribute nothing,
not even NaN gradients, and means are over valid examples (0 when there are none).

Order convention: `order[b, k]` is the index of the clip that transcript k (in the order the
sorter saw them) belongs to; `logits[b, k, j]` scores "transcript k belongs to clip j".
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# Largest K whose K! permutations are enumerated (8! = 40320).
MAX_EXACT_PERMUTATION_K = 8


def _valid_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean of values[b] over valid b; 0 when none is valid."""
  valid = valid.astype(bool)
  total = jnp.sum(jnp.where(valid, values, 0.0))
  return total / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)


def _l2_normalize(x: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def contrastive_loss(video_emb: jax.Array, text_emb: jax.Array, valid: jax.Array,
                     temperature: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Symmetric InfoNCE over the batch, the two directions summed (as the reference).

  The trainer passes the global batch; under jit with batch-sharded inputs XLA gathers the
  embeddings for the [B, B] similarity matrix.

  Args:
    video_emb: [B, E] video embeddings (cosine similarity: normalised here as well).
    text_emb: [B, E] text embeddings; row i is the positive of video i.
    valid: bool [B]; invalid rows and columns are left out of every softmax and mean.
    temperature: the similarities are divided by it.

  Returns:
    (loss, metrics): loss = mean video->text CE + mean text->video CE over valid examples;
    metrics `v2t_loss`, `t2v_loss`, `v2t_r1`, `t2v_r1` (in-batch recall@1 over valid examples).
  """
  valid = valid.astype(bool)
  # Zeroing invalid embeddings before the matmul keeps NaN/inf padding from leaking into the
  # gradients of valid examples through 0 * NaN.
  v = _l2_normalize(jnp.where(valid[:, None], video_emb.astype(jnp.float32), 0.0))
  t = _l2_normalize(jnp.where(valid[:, None], text_emb.astype(jnp.float32), 0.0))
  sim = v @ t.T / temperature  # [videos, texts]
  pair_ok = valid[:, None] & valid[None, :]
  # A large finite negative (not -inf) keeps rows with no valid column finite.
  sim = jnp.where(pair_ok, sim, -1e9)
  diag = jnp.diagonal(sim)
  v2t = jax.nn.logsumexp(sim, axis=1) - diag
  t2v = jax.nn.logsumexp(sim, axis=0) - diag
  v2t_loss, t2v_loss = _valid_mean(v2t, valid), _valid_mean(t2v, valid)
  idx = jnp.arange(sim.shape[0])
  metrics = dict(
      v2t_loss=v2t_loss,
      t2v_loss=t2v_loss,
      v2t_r1=_valid_mean((jnp.argmax(sim, axis=1) == idx).astype(jnp.float32), valid),
      t2v_r1=_valid_mean((jnp.argmax(sim, axis=0) == idx).astype(jnp.float32), valid),
  )
  return v2t_loss + t2v_loss, metrics


def _sanitize_logits(logits: jax.Array, valid: jax.Array) -> jax.Array:
  # Invalid rows become zeros, so their (possibly non-finite) values never reach a softmax
  # whose backward pass would turn 0 * NaN into NaN gradients.
  return jnp.where(valid.astype(bool)[:, None, None], logits.astype(jnp.float32), 0.0)


def _true_log_prob(log_probs: jax.Array, order: jax.Array) -> jax.Array:
  """log_probs[b, k, order[b, k]] -> [B, K]."""
  return jnp.take_along_axis(log_probs, order[..., None].astype(jnp.int32), axis=-1)[..., 0]


def softmax_positions_loss(logits: jax.Array, order: jax.Array,
                           valid: jax.Array) -> jax.Array:
  """The reference sort loss: per-transcript K-way cross-entropy against its true clip.

  Args:
    logits: [B, K, K] sorter logits.
    order: int [B, K], order[b, k] = true clip index of transcript k.
    valid: bool [B].

  Returns:
    Scalar: mean over the K transcripts and the valid examples.
  """
  log_probs = jax.nn.log_softmax(_sanitize_logits(logits, valid), axis=-1)
  per_example = -jnp.mean(_true_log_prob(log_probs, order), axis=-1)
  return _valid_mean(per_example, valid)


def sinkhorn(logits: jax.Array, iters: int, temperature: float = 1.0) -> jax.Array:
  """Log-domain Sinkhorn normalisation towards a doubly stochastic matrix.

  Alternately normalises rows and columns of logits / temperature in log space (stable for
  any scale). The last step normalises columns, so columns sum to 1 exactly and rows to within
  the convergence of `iters` iterations.

  Args:
    logits: [..., K, K].
    iters: row+column normalisation rounds (>= 1).
    temperature: divides the logits; lower is closer to a hard permutation.

  Returns:
    float32 log P, [..., K, K].
  """
  if isinstance(iters, int) and iters < 1:
    raise ValueError(f"sinkhorn iters must be >= 1, got {iters}")
  log_p = logits.astype(jnp.float32) / temperature

  def one_round(_, lp):
    lp = lp - jax.nn.logsumexp(lp, axis=-1, keepdims=True)  # rows
    return lp - jax.nn.logsumexp(lp, axis=-2, keepdims=True)  # columns

  # fori_loop with static bounds lowers to scan: reverse-differentiable, small graph.
  return jax.lax.fori_loop(0, iters, one_round, log_p)


def sinkhorn_loss(logits: jax.Array, order: jax.Array, valid: jax.Array, iters: int,
                  temperature: float = 1.0) -> jax.Array:
  """Negative log-likelihood of the true permutation under the Sinkhorn matrix.

  Normalisation: the MEAN over the K transcripts of -log P[k, order[k]] (not the sum), so the
  value is on the same per-transcript scale as `softmax_positions_loss` and `sort_weight`
  means the same for both.

  Args:
    logits: [B, K, K] sorter logits.
    order: int [B, K], order[b, k] = true clip index of transcript k.
    valid: bool [B].
    iters: Sinkhorn iterations.
    temperature: Sinkhorn temperature.

  Returns:
    Scalar: mean over the K transcripts and the valid examples.
  """
  log_p = sinkhorn(_sanitize_logits(logits, valid), iters, temperature)
  per_example = -jnp.mean(_true_log_prob(log_p, order), axis=-1)
  return _valid_mean(per_example, valid)


@functools.lru_cache(maxsize=None)
def permutations(k: int) -> np.ndarray:
  """All K! permutations of range(K) as int32 [K!, K], lexicographic (identity first)."""
  if k > MAX_EXACT_PERMUTATION_K:
    raise ValueError(f"exact permutation decoding enumerates K! orders; K={k} > "
                     f"{MAX_EXACT_PERMUTATION_K} is too many")
  return np.array(list(itertools.permutations(range(k))), np.int32)


def best_permutation(logits: jax.Array) -> jax.Array:
  """The assignment of transcripts to clips with the highest total logit.

  Exact, by scoring all K! permutations. Sinkhorn normalisation only adds per-row and
  per-column constants in log space, which every permutation sums once, so the decoded order
  is the same for raw logits and Sinkhorn log-probabilities.

  Args:
    logits: [B, K, K].

  Returns:
    int32 [B, K]: predicted clip index of each transcript, a permutation per example.
  """
  k = logits.shape[-1]
  perms = permutations(k)
  one_hot = jax.nn.one_hot(perms, k, dtype=jnp.float32)  # [K!, K(transcript), K(clip)]
  scores = jnp.einsum("bkj,pkj->bp", logits.astype(jnp.float32), one_hot)
  return jnp.asarray(perms)[jnp.argmax(scores, axis=-1)]


def kendall_tau(pred: jax.Array, order: jax.Array) -> jax.Array:
  """Kendall's tau between two orderings of K items, per example.

  Args:
    pred: int [B, K] predicted clip index per transcript (a permutation).
    order: int [B, K] true clip index per transcript.

  Returns:
    float32 [B] in [-1, 1]: (concordant - discordant) / (K (K - 1) / 2).
  """
  k = order.shape[-1]
  dp = jnp.sign(pred[:, :, None] - pred[:, None, :])
  do = jnp.sign(order[:, :, None] - order[:, None, :])
  # Each unordered pair appears twice (i, j) and (j, i), with the same product.
  return jnp.sum(dp * do, axis=(1, 2)).astype(jnp.float32) / (k * (k - 1))


def sort_metrics(logits: jax.Array, order: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
  """Sort accuracy metrics, averaged over valid examples.

  Args:
    logits: [B, K, K] sorter logits.
    order: int [B, K] true clip index per transcript.
    valid: bool [B].

  Returns:
    sort_acc: all K per-transcript argmax predictions right (the reference's metric;
      chance 1/K! at best).
    sort_acc_perm: the best permutation (exact K! search) is the true order (chance 1/K!).
    position_acc: fraction of transcripts whose argmax is right (chance 1/K).
    position_acc_perm: fraction of transcripts placed right by the best permutation.
    kendall_tau: Kendall's tau between the best permutation and the true order (chance 0).
  """
  logits = _sanitize_logits(logits, valid)
  order = order.astype(jnp.int32)
  argmax_hit = jnp.argmax(logits, axis=-1) == order
  pred = best_permutation(logits)
  perm_hit = pred == order
  f32 = lambda x: x.astype(jnp.float32)
  return dict(
      sort_acc=_valid_mean(f32(jnp.all(argmax_hit, axis=-1)), valid),
      sort_acc_perm=_valid_mean(f32(jnp.all(perm_hit, axis=-1)), valid),
      position_acc=_valid_mean(jnp.mean(f32(argmax_hit), axis=-1), valid),
      position_acc_perm=_valid_mean(jnp.mean(f32(perm_hit), axis=-1), valid),
      kendall_tau=_valid_mean(kendall_tau(pred, order), valid),
  )


def _softmax_positions(logits, order, valid, config):
  del config
  return softmax_positions_loss(logits, order, valid)


def _sinkhorn(logits, order, valid, config):
  return sinkhorn_loss(logits, order, valid, config.sinkhorn.iters,
                       config.sinkhorn.temperature)


# config.sort_loss -> fn(logits, order, valid, config) -> scalar.
SORT_LOSSES: dict[str, Callable[..., jax.Array]] = {
    "softmax_positions": _softmax_positions,
    "sinkhorn": _sinkhorn,
}


def total_loss(outputs: dict[str, jax.Array], order: jax.Array, valid: jax.Array,
               config: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The TVTS objective: contrastive_weight * contrastive + sort_weight * sort.

  Args:
    outputs: the dict returned by `TVTS.__call__` (video_emb, text_emb, sort_logits used).
    order: int [B, K] true clip index of each transcript.
    valid: bool [B].
    config: reads sort_loss, contrastive_weight, sort_weight, temperature and sinkhorn.

  Returns:
    (loss, metrics): metrics are float32 scalars averaged over valid examples: `loss`,
    `contrastive_loss`, `sort_loss`, the contrastive metrics and the `sort_metrics`.
  """
  if config.sort_loss not in SORT_LOSSES:
    raise ValueError(f"sort_loss={config.sort_loss!r}; must be one of {tuple(SORT_LOSSES)}")
  contrastive, metrics = contrastive_loss(outputs["video_emb"], outputs["text_emb"], valid,
                                          config.temperature)
  sort = SORT_LOSSES[config.sort_loss](outputs["sort_logits"], order, valid, config)
  loss = config.contrastive_weight * contrastive + config.sort_weight * sort
  metrics = dict(metrics, loss=loss, contrastive_loss=contrastive, sort_loss=sort)
  metrics.update(sort_metrics(jax.lax.stop_gradient(outputs["sort_logits"]), order, valid))
  return loss, metrics
