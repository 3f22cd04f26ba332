"""The configuration schema: every key a config may have, its default, and the checks.

`base_config()` returns the reference recipe (`../shared/REFERENCE.md`); the files in `configs/`
start from it and override. `validate(config)` is called when a config is loaded (by the trainer,
the benchmark and the evaluation), so that an unknown key, a typo or an impossible shape is an
error in the first second of a run rather than an hour into it.
"""

from __future__ import annotations

import ml_collections

SORT_LOSSES = ("softmax_positions", "sinkhorn")
COMPUTE_DTYPES = ("float32", "bfloat16")
SCHEDULES = ("step", "cosine", "constant")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
NONFINITE_POLICIES = ("skip", "stop")
# Keys that configs used to have, and what replaced them: named in the error instead of "unknown".
REPLACED_KEYS = {
    "eval_every_steps": "evals.<name>.every_steps (e.g. evals.sort.every_steps)",
    "eval": ("evals: a dict of named evaluations (tvts_jax/evaluators/); eval.protocols -> the "
             "names in config.evals (main.py --eval_names=a,b to run some), "
             "eval.probe_train_records -> evals.probe.train_records, eval.probe_test_records -> "
             "evals.probe.test_records, eval.retrieval_records -> evals.v2v_retrieval.records, "
             "eval.heldout_records -> evals.sort.records and evals.t2v_retrieval.records, "
             "eval.max_examples -> evals.<name>.max_examples, eval.probe_weight_decays / "
             "probe_holdout_fraction / probe_steps -> evals.probe.weight_decays / "
             "holdout_fraction / steps"),
}


def base_config() -> ml_collections.ConfigDict:
  """The reference recipe (TVTS v1, 32 V100s); every config starts from this."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 768  # global, over all devices and hosts
  # 20 epochs; set to 20 * num_train_videos // batch_size for your data.
  c.total_steps = 20_000
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1_000
  c.keep_checkpoints = 3
  c.sort_loss = "softmax_positions"
  c.sort_weight = 2.0
  c.temperature = 0.05  # contrastive
  c.sinkhorn = ml_collections.ConfigDict(dict(iters=20, temperature=1.0))
  c.compute_dtype = "float32"
  # '' (random init), 'mae:PATH' (ImageNet MAE ViT), 'tvts_torch:PATH' (reference checkpoint).
  c.init_from = ""
  c.nonfinite = "skip"  # a non-finite loss/gradient: skip the update, or stop the run.

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))  # -1: all remaining devices

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
      schedule="step",  # x decay_factor after each fraction of total_steps
      decay_fractions=(0.6, 0.8),  # epochs 12 and 16 of 20
      decay_factor=0.1,
      warmup_steps=0,
      grad_clip_norm=0.0,  # 0: no clipping
  ))

  c.model = ml_collections.ConfigDict(dict(
      embed_dim=256,  # contrastive projection
      remat="none",
      scan_layers=False,
      # jax.nn.dot_product_attention's implementation: 'xla' (every backend), 'cudnn'
      # (cuDNN's fused flash attention; NVIDIA GPUs, compute_dtype='bfloat16'), or 'auto':
      # 'cudnn' where it can run (the model is built for an NVIDIA GPU, bfloat16, head
      # dimensions cuDNN takes), else 'xla'. The parameters are the same for all three.
      attention="auto",
      video=ml_collections.ConfigDict(dict(
          width=768, depth=12, num_heads=12, mlp_dim=3072,
          patch_size=16, tubelet=2, keep_ratio=0.25, ln_eps=1e-6,
          # The reference zero-inits the temporal embedding (it starts from MAE weights). From
          # scratch, "normal" with a std of the patch embeddings' scale (~1) gives every token a
          # time signature from step 0; with zeros the sorter must grow it through its own
          # gradient first and sat at chance for 1000+ steps on the demo (README, The demo).
          temporal_init="zeros", temporal_init_std=0.02)),
      text=ml_collections.ConfigDict(dict(
          vocab_size=32_000, width=768, depth=6, num_heads=12, mlp_dim=3072, ln_eps=1e-6)),
      sorter=ml_collections.ConfigDict(dict(
          depth=2, num_heads=12, mlp_dim=3072, ln_eps=1e-6)),
  ))

  c.data = ml_collections.ConfigDict(dict(
      # Glob(s) or directories of TFRecord shards written by data_pipelines.prepare. Empty
      # train_records means: the built-in synthetic demo data, generated into the workdir.
      train_records="",
      eval_records="",
      tokenizer="",  # sentencepiece .model; empty with the demo data: trained on it.
      num_clips=4,  # K
      num_frames=16,  # T, over the whole span
      image_size=224,
      resize_short=268,
      clip_seconds=(3, 4, 5),  # one drawn per example
      gap_seconds=1.0,
      text_len=50,
      span_tries=8,  # spans tried per visit for one whose every clip has words
      min_words_per_clip=1,
      shuffle_buffer=1_000,
      eval_batch_size=0,  # 0: batch_size
      eval_batches=8,
      skip_corrupt_files=True,  # a truncated record file is reported and skipped
  ))

  # The synthetic narrated-video world used when data.train_records is empty.
  c.demo = ml_collections.ConfigDict(dict(
      num_train_videos=2_000, num_eval_videos=200, vocab_size=200))

  # Evaluations by name, each built with `tvts_jax.evaluators.config(type, ...)`: its `type`,
  # `every_steps` (0: only in `main.py --mode=eval`) and the options of the type; the shipped
  # configs take `evaluators.standard()`. Checked by `evaluators.check_config` when a run
  # starts (the evaluators, not this schema, own their options).
  c.evals = ml_collections.ConfigDict()
  return c


class ConfigError(ValueError):
  """A config that cannot run."""


def cudnn_attention_problem(config: ml_collections.ConfigDict) -> str | None:
  """Why cuDNN's fused attention cannot run this model (whatever the device), or None."""
  if config.compute_dtype != "bfloat16":
    return (f"cuDNN attention runs in bfloat16 only; set compute_dtype='bfloat16' (got "
            f"{config.compute_dtype!r})")
  v = config.model.video
  for tower, width in (("video", v.width), ("text", config.model.text.width),
                       ("sorter", v.width)):
    heads = config.model[tower].num_heads
    head_dim = width // heads if heads > 0 else 0
    if head_dim % 8 or not 0 < head_dim <= 128:
      return (f"model.{tower} has head dimension {head_dim}; cuDNN needs a multiple of 8, "
              "at most 128")
  return None


def _check_keys(config, reference, prefix=""):
  for key in config.keys():
    path = f"{prefix}{key}"
    if path in REPLACED_KEYS:
      raise ConfigError(f"config key {path!r} was replaced by {REPLACED_KEYS[path]}")
    if path == "evals":
      continue  # named by the user; checked by evaluators.check_config
    if key not in reference:
      close = [k for k in reference.keys() if k[:3] == key[:3]]
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ConfigError(f"unknown config key {path!r}{hint}")
    if isinstance(reference[key], ml_collections.ConfigDict):
      if not isinstance(config[key], ml_collections.ConfigDict):
        raise ConfigError(f"config key {path!r} must be a group, got {config[key]!r}")
      _check_keys(config[key], reference[key], path + ".")


def _choice(name, value, choices):
  if value not in choices:
    raise ConfigError(f"{name}={value!r}; must be one of {choices}")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks a config against the schema; returns it unchanged, or raises ConfigError."""
  _check_keys(config, base_config())
  _choice("sort_loss", config.sort_loss, SORT_LOSSES)
  _choice("compute_dtype", config.compute_dtype, COMPUTE_DTYPES)
  _choice("optim.schedule", config.optim.schedule, SCHEDULES)
  _choice("model.remat", config.model.remat, REMAT_POLICIES)
  _choice("model.attention", config.model.attention, ATTENTION_IMPLEMENTATIONS)
  _choice("nonfinite", config.nonfinite, NONFINITE_POLICIES)
  _choice("model.video.temporal_init", config.model.video.temporal_init, ("zeros", "normal"))
  if not config.model.video.temporal_init_std > 0:
    raise ConfigError("model.video.temporal_init_std must be > 0, got "
                      f"{config.model.video.temporal_init_std}")

  d, v = config.data, config.model.video
  for name in ("batch_size", "total_steps", "log_every_steps", "checkpoint_every_steps"):
    if config[name] <= 0:
      raise ConfigError(f"{name} must be positive, got {config[name]}")
  if d.image_size % v.patch_size:
    raise ConfigError(f"model.video.patch_size={v.patch_size} does not divide "
                      f"data.image_size={d.image_size}")
  if d.num_frames % v.tubelet:
    raise ConfigError(f"model.video.tubelet={v.tubelet} does not divide "
                      f"data.num_frames={d.num_frames}")
  if d.resize_short < d.image_size:
    raise ConfigError(f"data.resize_short={d.resize_short} is smaller than the crop "
                      f"data.image_size={d.image_size}")
  if not 0.0 < v.keep_ratio <= 1.0:
    raise ConfigError(f"model.video.keep_ratio={v.keep_ratio} must be in (0, 1]")
  if d.num_clips < 2:
    raise ConfigError(f"data.num_clips={d.num_clips}: sorting needs at least 2 clips")
  if config.sort_loss == "sinkhorn" and d.num_clips > 8:
    raise ConfigError("sort_loss='sinkhorn' decodes exact permutations; num_clips must be <= 8")
  for tower in ("video", "text"):
    t = config.model[tower]
    if t.width % t.num_heads:
      raise ConfigError(f"model.{tower}.width={t.width} is not divisible by "
                        f"num_heads={t.num_heads}")
  if v.width % config.model.sorter.num_heads:
    raise ConfigError(f"model.sorter.num_heads={config.model.sorter.num_heads} does not "
                      f"divide the sorter width (model.video.width={v.width})")
  if config.model.attention == "cudnn" and (problem := cudnn_attention_problem(config)):
    raise ConfigError(f"model.attention='cudnn': {problem}")  # 'auto' falls back to 'xla'
  if d.text_len < 2:
    raise ConfigError(f"data.text_len={d.text_len} must be at least 2")
  if not d.clip_seconds or min(d.clip_seconds) <= 0:
    raise ConfigError(f"data.clip_seconds={d.clip_seconds} must be positive lengths")
  if config.init_from and config.init_from.split(":", 1)[0] not in ("mae", "tvts_torch"):
    raise ConfigError(f"init_from={config.init_from!r}; expected 'mae:PATH' or "
                      "'tvts_torch:PATH'")
  if config.mesh.fsdp < 1 or (config.mesh.data < 1 and config.mesh.data != -1):
    raise ConfigError(f"mesh={config.mesh}; data is -1 or >= 1 and fsdp >= 1")
  return config


def num_tokens_per_slice(config) -> int:
  """Patches per tubelet slice, before token keeping."""
  return (config.data.image_size // config.model.video.patch_size) ** 2


def num_kept_per_slice(config) -> int:
  """Patches kept per tubelet slice during training (at least one)."""
  return max(1, int(round(num_tokens_per_slice(config) * config.model.video.keep_ratio)))
