"""The optimizer and learning-rate schedule, from `config.optim`."""

from __future__ import annotations

import re

import jax
import optax

# Parameters that never get weight decay: norms, biases, embeddings and the special tokens.
NO_DECAY = re.compile(r"(norm|bias|embed|pos_|cls|type_emb|scale)", re.IGNORECASE)


def make_schedule(config) -> optax.Schedule:
  """Learning rate per step.

  `step` (the reference): constant `lr`, times `decay_factor` after each of
  `decay_fractions` of `total_steps` (epochs 12 and 16 of 20 -> 0.6, 0.8). `cosine`: cosine
  decay to 0 over `total_steps`. Both after `warmup_steps` of linear warmup.
  """
  o, total = config.optim, config.total_steps
  warm = o.warmup_steps
  if o.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, warm, max(total, warm + 1), 0.0)
  if o.schedule == "step":
    boundaries = {int(f * total): o.decay_factor for f in o.decay_fractions}
    main = optax.piecewise_constant_schedule(o.lr, boundaries)
  else:
    main = optax.constant_schedule(o.lr)
  if not warm:
    return main
  # The decay boundaries stay at their absolute steps, as in the reference's epochs.
  return lambda step: main(step) * jax.numpy.minimum(1.0, (step + 1) / warm)


def decay_mask(params):
  """True for the weights that get weight decay (matrices and kernels, no embeddings)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.ndim >= 2 and not NO_DECAY.search(jax.tree_util.keystr(path)), params)


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW with the schedule, optional global-norm clipping and the decay mask."""
  o = config.optim
  tx = optax.adamw(make_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps,
                   weight_decay=o.weight_decay, mask=decay_mask)
  if o.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  return tx
