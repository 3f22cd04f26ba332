"""Losses and sort metrics against hand-computed and numpy values."""
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from tvts_jax import losses

# Jitted once per shape: on CPU a few compiles are much cheaper than eager op-by-op dispatch.
contrastive_loss = jax.jit(losses.contrastive_loss, static_argnums=3)
softmax_positions_loss = jax.jit(losses.softmax_positions_loss)
sinkhorn = jax.jit(losses.sinkhorn, static_argnums=(1, 2))
sinkhorn_loss = jax.jit(losses.sinkhorn_loss, static_argnums=(3, 4))
sort_metrics = jax.jit(losses.sort_metrics)
best_permutation = jax.jit(losses.best_permutation)


def _np_log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _np_contrastive(v, t, temperature):
  v = v / np.linalg.norm(v, axis=1, keepdims=True)
  t = t / np.linalg.norm(t, axis=1, keepdims=True)
  sim = v @ t.T / temperature
  idx = np.arange(len(v))
  return (-_np_log_softmax(sim, 1)[idx, idx].mean() - _np_log_softmax(sim, 0)[idx, idx].mean())


def _random_orders(rng, b, k):
  return np.stack([rng.permutation(k) for _ in range(b)]).astype(np.int32)


# --- contrastive --------------------------------------------------------------------------


def test_contrastive_hand_computed():
  # Orthonormal pairs at temperature 1: every row/column softmax is e / (e + 1) on the
  # positive, so each direction costs log(1 + 1/e) and the sum twice that.
  eye = jnp.eye(2)
  loss, m = contrastive_loss(eye, eye, jnp.array([True, True]), 1.0)
  np.testing.assert_allclose(loss, 2 * math.log(1 + math.exp(-1)), rtol=1e-6)
  np.testing.assert_allclose(m["v2t_loss"], math.log(1 + math.exp(-1)), rtol=1e-6)
  assert m["v2t_r1"] == 1.0 and m["t2v_r1"] == 1.0


def test_contrastive_recall_at_1():
  # Text i is the video of perm[i]: only example 2 retrieves its own partner.
  v = jnp.eye(3)
  t = v[jnp.array([1, 0, 2])]
  _, m = contrastive_loss(v, t, jnp.ones(3, bool), 0.05)
  np.testing.assert_allclose(m["v2t_r1"], 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(m["t2v_r1"], 1 / 3, rtol=1e-6)


def test_contrastive_matches_numpy_and_ignores_invalid_examples():
  rng = np.random.RandomState(0)
  v, t = rng.randn(5, 8).astype(np.float32), rng.randn(5, 8).astype(np.float32)
  valid = np.array([True, True, False, True, False])
  # Padding examples may hold anything, NaN included.
  v_pad, t_pad = v.copy(), t.copy()
  v_pad[~valid], t_pad[~valid] = np.nan, np.inf
  fn = lambda a, b: contrastive_loss(a, b, jnp.asarray(valid), 0.1)[0]
  loss, (gv, gt) = jax.value_and_grad(fn, argnums=(0, 1))(v_pad, t_pad)
  np.testing.assert_allclose(loss, _np_contrastive(v[valid], t[valid], 0.1), rtol=1e-5)
  assert np.isfinite(gv).all() and np.isfinite(gt).all()
  assert not gv[~valid].any() and not gt[~valid].any()
  assert np.abs(gv[valid]).sum() > 0


def test_losses_are_zero_and_finite_without_valid_examples():
  none = jnp.zeros(3, bool)
  loss, m = contrastive_loss(jnp.ones((3, 4)), jnp.ones((3, 4)), none, 0.05)
  logits = jnp.ones((3, 4, 4))
  order = jnp.tile(jnp.arange(4), (3, 1))
  values = [loss, *m.values(), softmax_positions_loss(logits, order, none),
            sinkhorn_loss(logits, order, none, 5),
            *sort_metrics(logits, order, none).values()]
  np.testing.assert_array_equal(np.array(values), 0.0)


# --- sort losses --------------------------------------------------------------------------


def test_softmax_positions_hand_computed():
  # Transcript 0: logits (0, log 3), true clip 1 -> p = 3/4. Transcript 1: (0, 0), true 0.
  logits = jnp.array([[[0.0, math.log(3)], [0.0, 0.0]]])
  loss = softmax_positions_loss(logits, jnp.array([[1, 0]]), jnp.array([True]))
  np.testing.assert_allclose(loss, (math.log(4 / 3) + math.log(2)) / 2, rtol=1e-6)


def test_softmax_positions_matches_numpy_and_masks():
  rng = np.random.RandomState(1)
  logits = rng.randn(4, 4, 4).astype(np.float32)
  order = _random_orders(rng, 4, 4)
  valid = np.array([True, False, True, True])
  logits_pad = logits.copy()
  logits_pad[1] = np.nan
  fn = lambda x: softmax_positions_loss(x, order, valid)
  loss, grad = jax.value_and_grad(fn)(logits_pad)
  lp = _np_log_softmax(logits, -1)
  per_example = -np.take_along_axis(lp, order[..., None], -1)[..., 0].mean(-1)
  np.testing.assert_allclose(loss, per_example[valid].mean(), rtol=1e-5)
  assert np.isfinite(grad).all() and not grad[1].any()


def test_sinkhorn_is_doubly_stochastic():
  logits = jnp.asarray(np.random.RandomState(2).randn(3, 5, 5) * 2, jnp.float32)
  p = np.exp(sinkhorn(logits, iters=100, temperature=1.0))
  np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(p.sum(-2), 1.0, atol=1e-5)
  assert p.std() > 0.1  # not trivially uniform


def test_sinkhorn_loss_hand_computed_2x2():
  # Sinkhorn keeps the cross-ratio P00 P11 / (P01 P10) = e^a of [[a, 0], [0, 0]]; the doubly
  # stochastic 2x2 with that ratio has P00 = P11 = sigmoid(a / 2). a = 2 log 3 -> 3/4.
  logits = jnp.array([[[2 * math.log(3), 0.0], [0.0, 0.0]]])
  loss = sinkhorn_loss(logits, jnp.array([[0, 1]]), jnp.array([True]), iters=30)
  np.testing.assert_allclose(loss, -math.log(0.75), rtol=1e-5)
  # Temperature divides the logits.
  hot = sinkhorn_loss(logits * 2, jnp.array([[0, 1]]), jnp.array([True]), iters=30,
                             temperature=2.0)
  np.testing.assert_allclose(hot, loss, rtol=1e-6)


def test_sinkhorn_loss_matches_numpy_and_perfect_scores_give_zero():
  rng = np.random.RandomState(3)
  logits = rng.randn(3, 4, 4).astype(np.float32)
  order = _random_orders(rng, 3, 4)
  valid = np.array([True, True, False])
  lp = logits.astype(np.float64)
  for _ in range(7):
    lp = _np_log_softmax(lp, -1)
    lp = _np_log_softmax(lp, -2)
  expected = -np.take_along_axis(lp, order[..., None], -1)[..., 0].mean(-1)[valid].mean()
  np.testing.assert_allclose(sinkhorn_loss(logits, order, valid, iters=7), expected,
                             rtol=1e-5)
  perfect = 20.0 * np.eye(4, dtype=np.float32)[order]  # row k one-hot at clip order[k]
  assert sinkhorn_loss(perfect, order, np.ones(3, bool), iters=20) < 1e-3
  assert softmax_positions_loss(perfect, order, np.ones(3, bool)) < 1e-3


# --- decoding and metrics -----------------------------------------------------------------


def test_best_permutation_matches_brute_force():
  logits = np.random.RandomState(4).randn(6, 5, 5).astype(np.float32)
  expected = [max(itertools.permutations(range(5)),
                  key=lambda p, x=x: sum(x[k, p[k]] for k in range(5))) for x in logits]
  np.testing.assert_array_equal(best_permutation(logits), np.array(expected))


def test_sort_metrics_perfect_and_reversed():
  order = jnp.array([[2, 0, 3, 1], [0, 1, 2, 3]])
  valid = jnp.ones(2, bool)
  m = sort_metrics(10.0 * jnp.eye(4)[order], order, valid)
  for name in ("sort_acc", "sort_acc_perm", "position_acc", "position_acc_perm",
               "kendall_tau"):
    assert m[name] == 1.0, name
  # Predict each transcript at the mirrored clip: every pair is discordant.
  m = sort_metrics(10.0 * jnp.eye(4)[3 - order], order, valid)
  assert m["sort_acc"] == 0.0 and m["position_acc"] == 0.0 and m["sort_acc_perm"] == 0.0
  np.testing.assert_allclose(m["kendall_tau"], -1.0)


def test_sort_metrics_hand_computed():
  # Argmax puts transcripts 0 and 1 on clip 0 (not a permutation). The best permutation is
  # (1, 0, 2) with score 4 + 5 + 5 = 14 > 10 for the identity. Versus the true identity:
  # pairs (0,1) discordant, (0,2) and (1,2) concordant -> tau = (2 - 1) / 3.
  logits = jnp.array([[[5.0, 4.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0]]])
  order = jnp.array([[0, 1, 2]])
  np.testing.assert_array_equal(best_permutation(logits), [[1, 0, 2]])
  m = sort_metrics(logits, order, jnp.array([True]))
  np.testing.assert_allclose(
      [m["sort_acc"], m["position_acc"], m["sort_acc_perm"], m["position_acc_perm"],
       m["kendall_tau"]], [0.0, 2 / 3, 0.0, 1 / 3, 1 / 3], rtol=1e-6)


def test_sort_metrics_average_over_valid_examples_only():
  order = jnp.array([[0, 1, 2, 3]] * 3)
  logits = 10.0 * jnp.stack([jnp.eye(4), jnp.eye(4)[::-1], jnp.full((4, 4), jnp.nan)])
  m = sort_metrics(logits, order, jnp.array([True, True, False]))
  np.testing.assert_allclose(m["sort_acc"], 0.5)
  np.testing.assert_allclose(m["kendall_tau"], 0.0)  # (1 + -1) / 2


def test_kendall_tau_single_adjacent_swap():
  tau = losses.kendall_tau(jnp.array([[1, 0, 2, 3]]), jnp.array([[0, 1, 2, 3]]))
  np.testing.assert_allclose(tau, [(5 - 1) / 6])


def test_permutation_table():
  assert losses.permutations(4).shape == (24, 4)
  np.testing.assert_array_equal(losses.permutations(4)[0], np.arange(4))
  with pytest.raises(ValueError, match="K!"):
    losses.permutations(9)


# --- total ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sort_loss", ["softmax_positions", "sinkhorn"])
def test_total_loss_combines_parts(sort_loss):
  config = tiny.get_config()
  config.sort_loss = sort_loss
  rng = np.random.RandomState(5)
  b, k = 4, config.data.num_clips
  out = dict(video_emb=rng.randn(b, 8).astype(np.float32),
             text_emb=rng.randn(b, 8).astype(np.float32),
             sort_logits=rng.randn(b, k, k).astype(np.float32))
  order = _random_orders(rng, b, k)
  valid = np.array([True, True, True, False])
  loss, m = jax.jit(functools.partial(losses.total_loss, config=config))(out, order, valid)
  contrastive, _ = contrastive_loss(out["video_emb"], out["text_emb"], valid,
                                           config.temperature)
  if sort_loss == "sinkhorn":
    sort = sinkhorn_loss(out["sort_logits"], order, valid, config.sinkhorn.iters,
                                config.sinkhorn.temperature)
  else:
    sort = softmax_positions_loss(out["sort_logits"], order, valid)
  np.testing.assert_allclose(loss, contrastive + config.sort_weight * sort, rtol=1e-6)
  np.testing.assert_allclose(m["sort_loss"], sort, rtol=1e-6)
  assert {"loss", "contrastive_loss", "v2t_r1", "t2v_r1", "sort_acc", "kendall_tau"} <= set(m)
  assert all(np.shape(x) == () for x in m.values())

  config.sort_loss = "bogus"
  with pytest.raises(ValueError, match="sort_loss"):
    losses.total_loss(out, order, valid, config)


def test_total_loss_weights_each_part():
  """contrastive_weight scales the contrastive part; 0 leaves the sort loss alone (and 0 sort
  weight the contrastive loss alone): the ablation's arms."""
  config = tiny.get_config()
  rng = np.random.RandomState(6)
  b, k = 4, config.data.num_clips
  out = dict(video_emb=rng.randn(b, 8).astype(np.float32),
             text_emb=rng.randn(b, 8).astype(np.float32),
             sort_logits=rng.randn(b, k, k).astype(np.float32))
  order, valid = _random_orders(rng, b, k), np.ones(b, bool)
  contrastive, _ = contrastive_loss(out["video_emb"], out["text_emb"], valid, config.temperature)
  sort = softmax_positions_loss(out["sort_logits"], order, valid)
  for cw, sw in ((0.5, 3.0), (0.0, 2.0), (1.0, 0.0)):
    config.contrastive_weight, config.sort_weight = cw, sw
    loss, m = losses.total_loss(out, order, valid, config)
    np.testing.assert_allclose(loss, cw * contrastive + sw * sort, rtol=1e-6)
    np.testing.assert_allclose(m["contrastive_loss"], contrastive, rtol=1e-6)  # unweighted
  # The sort arm: no gradient reaches the contrastive embeddings.
  config.contrastive_weight, config.sort_weight = 0.0, 2.0
  grads = jax.grad(lambda o: losses.total_loss(o, order, valid, config)[0])(out)
  assert not np.any(grads["video_emb"]) and not np.any(grads["text_emb"])
  assert np.any(grads["sort_logits"])
