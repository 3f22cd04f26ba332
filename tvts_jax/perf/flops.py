"""FLOPs of the training step counted from the config, device peaks, and MFU."""

from __future__ import annotations

import ml_collections

from tvts_jax import config_schema

# Dense (no sparsity) bf16 peak FLOP/s of one chip, from the vendors' spec sheets, keyed by a
# lower-case substring of `jax.Device.device_kind`. The first match wins, so the more specific
# names come first ("TPU v5 lite" is a v5e, a v5p reports "TPU v5").
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v4", 275e12),
    ("h200", 989e12),  # also GH200: the same Hopper SM count and clock
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),  # SXM5
    ("a100", 312e12),
)


def _block_flops(batch: int, seq: int, width: int, mlp_dim: int,
                 queries: int | None = None) -> int:
  """Forward matmul FLOPs of one pre-LN block (`layers.Block`) over `batch` sequences.

  Args:
    batch: number of sequences.
    seq: tokens per sequence (the keys and values).
    width: model width D (all heads together).
    mlp_dim: MLP hidden width M.
    queries: rows of the output that are used downstream (all `seq` when None): keys and
      values are needed for every token, everything else only for these rows.

  Returns:
    2 * multiply-adds: K/V projections 2*seq*2D^2, Q projection + output projection
    2*q*2D^2, MLP 2*q*2DM, attention scores and weighted values 2*2*q*seq*D.
  """
  q = seq if queries is None else queries
  kv = 2 * batch * seq * width * 2 * width
  rows = 2 * batch * q * (2 * width * width + 2 * width * mlp_dim)
  attention = 2 * 2 * batch * q * seq * width
  return kv + rows + attention


def _divided_block_flops(batch: int, frames: int, n: int, width: int, mlp_dim: int) -> int:
  """Forward matmul FLOPs of one divided space-time block over [CLS, frames x n patches].

  Two attentions (temporal, then spatial), each with its q/k/v and output projections over
  every token; the CLS query attends to every token, a patch to the CLS and its slot in every
  frame (temporal) or its frame's patches (spatial); one MLP.
  """
  seq = 1 + frames * n
  projections = 2 * (2 * batch * seq * 4 * width * width)
  mlp = 2 * batch * seq * 2 * width * mlp_dim
  pairs = 2 * seq + frames * n * (frames + 1) + frames * n * (n + 1)  # (query, key) pairs
  return projections + mlp + 2 * 2 * batch * pairs * width


def analytic_flops(config: ml_collections.ConfigDict, batch_size: int,
                   text_len: int | None = None) -> dict[str, int]:
  """Matmul FLOPs of one training step, counted from the config.

  Counts the forward matmuls whose results reach the loss, and multiplies by 3 (backward =
  2 x forward: gradients of activations and of weights; frozen parameters' weight gradients,
  which the step does not compute, are counted all the same). Only what the loss reads is counted:
  the video tower on the kept tokens, the text tower's last block for the first (read-out)
  token only, the sorter's last block for the K transcript positions only (keys and values of
  every token are counted in both). Elementwise work (LayerNorm, GELU, softmax, AdamW) is
  not counted. The x3 slightly overcounts the patch embedding, which needs no input gradient.

  Args:
    config: a validated config.
    batch_size: global batch B.
    text_len: transcript length L (default config.data.text_len).

  Returns:
    FLOPs by part (forward, whole global batch): `patch_embed`, `video_blocks`, `text`,
    `sorter`, `heads` (contrastive projections and similarity, sorter input projection and
    output head), their sum `forward`, and `total` = 3 * forward.
  """
  v, t, s, d = config.model.video, config.model.text, config.model.sorter, config.data
  b, k = batch_size, d.num_clips
  length = d.text_len if text_len is None else text_len
  tubes = d.num_frames // v.tubelet
  kept = config_schema.num_kept_per_slice(config)
  video_tokens = 1 + tubes * kept
  e = config.model.embed_dim
  dv, dt = config_schema.output_widths(config)  # what the sorter and the heads read
  if v.attention_layout == "divided":
    video_blocks = v.depth * _divided_block_flops(b, tubes, kept, v.width, v.mlp_dim)
  else:
    video_blocks = v.depth * _block_flops(b, video_tokens, v.width, v.mlp_dim)
  heads = (2 * b * b * e  # contrastive similarity matrix
           + (2 * b * k * dt * dv if dt != dv else 0)  # sorter input
           + 2 * b * k * dv * k)  # sorter head
  if config.model.contrastive_head == "projections":
    heads += 2 * b * dv * e + 2 * b * k * dt * e  # video and text projections
  parts = {
      "patch_embed": 2 * b * tubes * kept * (v.tubelet * v.patch_size**2 * 3) * v.width,
      "video_blocks": video_blocks + 2 * b * video_tokens * v.width * v.proj_dim,
      "text": ((t.depth - 1) * _block_flops(b * k, length, t.width, t.mlp_dim)
               + _block_flops(b * k, length, t.width, t.mlp_dim, queries=1)
               + 2 * b * k * t.width * t.proj_dim),
      "sorter": ((s.depth - 1) * _block_flops(b, video_tokens + k, dv, s.mlp_dim)
                 + _block_flops(b, video_tokens + k, dv, s.mlp_dim, queries=k)),
      "heads": heads,
  }
  parts = {name: int(x) for name, x in parts.items()}
  parts["forward"] = sum(parts.values())
  parts["total"] = 3 * parts["forward"]
  return parts


def peak_flops_per_device(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device from `PEAK_BF16_FLOPS`; None if unknown (CPU)."""
  kind = device_kind.lower()
  for key, flops in PEAK_BF16_FLOPS:
    if key in kind:
      return flops
  return None


def mfu(flops_per_step: float, step_time_s: float, num_devices: int,
        peak_per_device: float | None) -> float | None:
  """Model FLOPs utilisation: achieved FLOP/s over the peak of all the devices used.

  Args:
    flops_per_step: model FLOPs of one global step (e.g. `analytic_flops(...)['total']`).
    step_time_s: seconds per step.
    num_devices: devices the step runs on.
    peak_per_device: peak FLOP/s of one device; None (unknown, CPU) gives None.

  Returns:
    A fraction in [0, 1] for a sane measurement, or None.
  """
  if peak_per_device is None or step_time_s <= 0:
    return None
  return flops_per_step / step_time_s / (num_devices * peak_per_device)
