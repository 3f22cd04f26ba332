"""The configuration schema: every key a config may have, its default, its meaning, the checks.

`KEYS` is the one table of keys: `base_config()` is built from it (the reference TVTS recipe;
`docs/recipe.md` says where each value comes from) and the README's configuration reference is
generated from it (`python -m tvts_jax.config_reference`; a test keeps the two equal). The files
in `configs/` start from `base_config()` and override. `validate(config)` is called when a
config is loaded (by the trainer, the benchmark, the evaluation and the model itself), so that
an unknown key, a typo or an impossible shape is an error in the first second of a run rather
than an hour into it. The evaluations (`config.evals`) are named by the user and own their
options: `tvts_jax.evaluators.check_config` checks them when a run starts.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import ml_collections

SORT_LOSSES = ("softmax_positions", "sinkhorn")
COMPUTE_DTYPES = ("float32", "bfloat16")
SCHEDULES = ("step", "cosine", "constant")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
NONFINITE_POLICIES = ("skip", "stop")
TEMPORAL_INITS = ("zeros", "normal")
INIT_KINDS = ("mae", "distilbert", "clip", "tvts_torch", "tvts_v2_torch")
TEXT_ARCHS = ("tvts", "distilbert", "clip")  # model.text.arch (tvts_jax/models/text_tower.py)
ATTENTION_LAYOUTS = ("joint", "divided")
MASKS = ("per_slice", "tube")
ACTIVATIONS = ("gelu", "quick_gelu")
CONTRASTIVE_HEADS = ("projections", "identity")
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

# (key, default, meaning). `prefix.{a,b,c}` names several keys of one group at once, with a
# tuple of their defaults. The defaults are the reference recipe (TVTS v1 on 32 V100s).
KEYS: tuple[tuple[str, Any, str], ...] = (
    ("seed", 0, "parameters, token keeping and data order"),
    ("batch_size", 768, "global batch over all devices and hosts (divisible by the device "
     "count)"),
    ("total_steps", 20_000, "set to `20 * num_train_videos // batch_size` for the reference's "
     "20 epochs"),
    ("{log_every_steps,checkpoint_every_steps}", (50, 1_000), "periods, in steps"),
    ("keep_checkpoints", 3, "newest checkpoints kept"),
    ("sort_loss", "softmax_positions", "or `sinkhorn` (log-domain Sinkhorn, NLL of the true "
     "permutation)"),
    ("contrastive_weight", 1.0, "`loss = contrastive_weight * contrastive + sort_weight * "
     "sort`; 0: the sort loss alone (the ablation's `sort` arm)"),
    ("sort_weight", 2.0, "`loss = contrastive_weight * contrastive + sort_weight * sort`; 0: "
     "the contrastive loss alone"),
    ("sort_trains_text", False, "the sort loss also trains the text tower (the reference "
     "stop-gradients the transcript features the sorter reads)"),
    ("temperature", 0.05, "contrastive temperature (cosine similarities over the global batch)"),
    ("sinkhorn.{iters,temperature}", (20, 1.0), "Sinkhorn normalisation"),
    ("compute_dtype", "float32", "`bfloat16`: bf16 matmuls, fp32 parameters, optimizer state, "
     "norms, softmax and losses (on CPU also fp32 activations: docs/performance.md)"),
    ("init_from", "", "comma-separated `KIND:PATH` sources applied in order when a run starts "
     "without a checkpoint: `mae:` (ImageNet MAE ViT), `distilbert:` (a Hugging Face "
     "DistilBERT folder or file), `clip:` (a Hugging Face CLIP: both towers), `tvts_torch:` / "
     "`tvts_v2_torch:` (a reference TVTS / TVTSv2 checkpoint)"),
    ("nonfinite", "skip", "a non-finite loss/gradient: `skip` the update (counted) or `stop` "
     "naming the step"),
    ("mesh.{data,fsdp}", (-1, 1), "device mesh; -1 = all remaining devices"),
    ("optim.{lr,b1,b2,eps}", (1e-4, 0.9, 0.999, 1e-8), "AdamW"),
    ("optim.weight_decay", 0.0, "decoupled; never on norms, biases and embeddings"),
    ("optim.schedule", "step", "`step` (x `decay_factor` at each of `decay_fractions` of "
     "`total_steps`), `cosine`, `constant`"),
    ("optim.{decay_fractions,decay_factor}", ((0.6, 0.8), 0.1), "the step schedule: epochs 12 "
     "and 16 of 20"),
    ("optim.warmup_steps", 0, "linear warmup"),
    ("optim.grad_clip_norm", 0.0, "global-norm clipping; 0 = off"),
    ("optim.param_groups", (), "ordered rules `(regex, lr_multiplier, weight_decay)` over the "
     "parameter paths, the first match wins (replacing `weight_decay` and its mask); "
     "multiplier 0 freezes (tvts_jax/optim.py)"),
    ("model.embed_dim", 256, "contrastive projection"),
    ("model.contrastive_head", "projections", "`projections`: a Linear on the video CLS and "
     "ReLU + Linear on each transcript feature, to `embed_dim` (TVTS); `identity`: the towers' "
     "own outputs (TVTSv2: their `proj_dim`s, equal to `embed_dim`)"),
    ("model.remat", "none", "per-block rematerialisation: `none`, `full`, `dots`, "
     "`dots_no_batch` (on CPU only with `scan_layers=True`)"),
    ("model.scan_layers", False, "scan over blocks (compile time independent of depth)"),
    ("model.attention", "auto", "attention kernel: `xla` (every backend), `cudnn` (NVIDIA GPUs, "
     "bf16), or `auto`: `cudnn` where it can run, else `xla`; the parameters are the same"),
    ("model.video.{width,depth,num_heads,mlp_dim}", (768, 12, 12, 3072), "ViT-B"),
    ("model.video.{patch_size,tubelet}", (16, 2), "tubelets of 2x16x16"),
    ("model.video.keep_ratio", 0.25, "patches kept per sample and temporal slice in training "
     "(all at evaluation)"),
    ("model.video.ln_eps", 1e-6, "LayerNorm epsilon"),
    ("model.video.attention_layout", "joint", "`joint` space-time attention (TVTS), or "
     "`divided`: in every block a temporal attention (each patch with its slot in every frame, "
     "and the CLS) before the spatial one, its output zero at init (TVTSv2)"),
    ("model.video.mask", "per_slice", "token keeping: `per_slice` (each temporal slice its own "
     "patches) or `tube` (the same positions in every slice; `divided` needs it)"),
    ("model.video.{patch_bias,ln_pre}", (True, False), "a bias in the patch embedding; a "
     "LayerNorm on the tokens entering the blocks (CLIP's `ln_pre`)"),
    ("model.video.activation", "gelu", "the blocks' MLP: `gelu` (exact) or `quick_gelu` "
     "(CLIP's)"),
    ("model.video.proj_dim", 0, "> 0: every output token projected to this width after the "
     "final LayerNorm (CLIP's `proj`); the sorter then works at this width"),
    ("model.video.temporal_init", "zeros", "temporal embedding init: `zeros` (the reference, "
     "which starts from MAE) or `normal`"),
    ("model.video.temporal_init_std", 0.02, "std of `normal`; from scratch, the patch "
     "embeddings' scale (~1) lets the sorter see time from step 0 (the demo uses 1.0)"),
    ("model.text.arch", "distilbert", "the transcript encoder: `distilbert` (post-LN, "
     "embedding LayerNorm, [CLS] read-out: the reference's), `clip` (CLIP's: causal, pre-LN, "
     "QuickGELU, read at the end-of-text token) or `tvts` (pre-LN, BOS read-out)"),
    ("model.text.{vocab_size,width,depth,num_heads,mlp_dim}", (30_522, 768, 6, 12, 3072),
     "distilbert-base-uncased"),
    ("model.text.max_positions", 512, "rows of the position table; 0 = `data.text_len`"),
    ("model.text.proj_dim", 0, "> 0: the feature projected to this width (CLIP's "
     "`text_projection`)"),
    ("model.text.ln_eps", 1e-12, "LayerNorm epsilon"),
    ("model.sorter.{depth,num_heads,mlp_dim}", (2, 12, 3072), "the sorter (its width: the "
     "video tower's output, `proj_dim` or `width`)"),
    ("model.sorter.ln_eps", 1e-6, "LayerNorm epsilon"),
    ("data.{train_records,eval_records}", ("", ""), "globs, comma-separated globs or "
     "directories of shards; empty train = the demo data"),
    ("data.tokenizer", "", "a sentencepiece `.model` or a Hugging Face `tokenizer.json` (the "
     "pretrained text tower's own; required with your own records, trained on the demo data "
     "otherwise)"),
    ("data.num_clips", 4, "K"),
    ("data.num_frames", 16, "T frames over the whole span"),
    ("data.{image_size,resize_short}", (224, 268), "crop size; short side the frames are "
     "resized to"),
    ("data.{clip_seconds,gap_seconds}", ((3, 4, 5), 1.0), "clip length drawn per example; gap "
     "between clips"),
    ("data.text_len", 50, "tokens per transcript (the read-out token included)"),
    ("data.{span_tries,min_words_per_clip}", (8, 1), "spans tried for one with words in every "
     "clip; otherwise `valid=False`"),
    ("data.min_video_seconds", 0.0, "records shorter than this are `valid=False` (a video "
     "shorter than every span is otherwise sampled on the span [0, duration - 1], cut into "
     "`num_clips` clips with the same gaps)"),
    ("data.shuffle_buffer", 1_000, "examples"),
    ("data.{threads,parallel_calls,prefetch_batches}", (0, 0, 0), "the input pipeline's "
     "thread pool (0 = one thread per core), examples sampled at once and batches prefetched "
     "(0 = `tf.data.AUTOTUNE`)"),
    ("data.dct_downscale", True, "frames stored at >= 2x `resize_short` are decoded at JPEG's "
     "DCT-domain scale 1/2, 1/4 or 1/8 (much cheaper than decoding whole and resizing; "
     "slightly different pixels)"),
    ("data.samples_per_visit", 1, "training examples drawn from each record read (each with "
     "its own span, frames, crop and order). "
     "The N examples of a record are adjacent: a batch then holds `batch_size / N` videos"),
    ("data.{eval_batch_size,eval_batches}", (0, 8), "the evaluations' global batch (0 = "
     "`batch_size`); held-out batches of `sort` and `t2v_retrieval`"),
    ("data.skip_corrupt_files", True, "a record file cut in the middle is reported and "
     "skipped past"),
    ("demo.{num_train_videos,num_eval_videos,vocab_size}", (2_000, 200, 200), "the built-in "
     "demo data"),
    ("demo.generator_version", 3, "the demo world: 3, two objects whose actions must be seen "
     "moving to be told apart (a transcript's clip is found by motion), or 2, one new object "
     "per event (found by colour and shape)"),
)
# Configs written before a key existed had these values for it (where today's default differs),
# so that an older workdir or export still builds the model it was trained with.
LEGACY_DEFAULTS = {"model.text.arch": "tvts", "model.text.max_positions": 0,
                   "demo.generator_version": 2}

# Not in KEYS: `evals`, a dict of named evaluations (tvts_jax/evaluators/; their options are
# the evaluators' own, in the README's reference too).


def expand_keys() -> Iterator[tuple[str, Any, str]]:
  """(dotted key, default, meaning) for every single key of `KEYS`."""
  for key, default, meaning in KEYS:
    m = re.fullmatch(r"(.*?)\{([\w,]+)\}", key)
    if not m:
      yield key, default, meaning
      continue
    names = m.group(2).split(",")
    if not isinstance(default, tuple) or len(default) != len(names):
      raise AssertionError(f"{key}: needs a tuple of {len(names)} defaults")
    for name, value in zip(names, default):
      yield m.group(1) + name, value, meaning


def base_config() -> ml_collections.ConfigDict:
  """The reference recipe (TVTS v1, 32 V100s), built from `KEYS`; every config starts here."""
  c = ml_collections.ConfigDict()
  for key, default, _ in expand_keys():
    *groups, name = key.split(".")
    node = c
    for group in groups:
      if group not in node:
        node[group] = ml_collections.ConfigDict()
      node = node[group]
    node[name] = default
  # Evaluations by name, each built with `tvts_jax.evaluators.config(type, ...)`; the shipped
  # configs take `evaluators.standard()`.
  c.evals = ml_collections.ConfigDict()
  return c


def format_value(value: Any) -> str:
  """A default as the configuration reference shows it."""
  if isinstance(value, str):
    return f"`{value}`" if value else "`''`"
  return repr(value) if isinstance(value, float) else str(value)


def reference_markdown() -> str:
  """The configuration reference table of the README (every key of `KEYS`)."""
  rows = ["| key | default | meaning |", "|---|---|---|"]
  for key, default, meaning in KEYS:
    several = "{" in key
    shown = (", ".join(format_value(v) for v in default) if several else format_value(default))
    rows.append(f"| `{key}` | {shown} | {meaning} |")
  return "\n".join(rows)


class ConfigError(ValueError):
  """A config that cannot run."""


def cudnn_attention_problem(config: ml_collections.ConfigDict) -> str | None:
  """Why cuDNN's fused attention cannot run this model (whatever the device), or None."""
  if config.compute_dtype != "bfloat16":
    return (f"cuDNN attention runs in bfloat16 only; set compute_dtype='bfloat16' (got "
            f"{config.compute_dtype!r})")
  v = config.model.video
  for tower, width in (("video", v.width), ("text", config.model.text.width),
                       ("sorter", output_widths(config)[0])):
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
  _choice("model.text.arch", config.model.text.arch, TEXT_ARCHS)
  _choice("model.video.attention_layout", config.model.video.attention_layout, ATTENTION_LAYOUTS)
  _choice("model.video.mask", config.model.video.mask, MASKS)
  _choice("model.video.activation", config.model.video.activation, ACTIVATIONS)
  _choice("model.contrastive_head", config.model.contrastive_head, CONTRASTIVE_HEADS)
  _choice("model.video.temporal_init", config.model.video.temporal_init, TEMPORAL_INITS)
  if not config.model.video.temporal_init_std > 0:
    raise ConfigError("model.video.temporal_init_std must be > 0, got "
                      f"{config.model.video.temporal_init_std}")

  for name in ("contrastive_weight", "sort_weight"):
    if not config[name] >= 0:
      raise ConfigError(f"{name}={config[name]} must be >= 0")
  if config.contrastive_weight == 0 and config.sort_weight == 0:
    raise ConfigError("contrastive_weight and sort_weight are both 0: nothing would be "
                      "trained; set at least one of them > 0")

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
  video_out, text_out = output_widths(config)
  if v.width % config.model.sorter.num_heads or video_out % config.model.sorter.num_heads:
    raise ConfigError(f"model.sorter.num_heads={config.model.sorter.num_heads} does not "
                      f"divide the sorter width ({video_out}: the video tower's output)")
  if (v.attention_layout == "divided" and config.model.video.keep_ratio < 1
      and v.mask != "tube"):
    raise ConfigError("model.video.attention_layout='divided' attends over each spatial slot "
                      "through time, so token keeping must keep the same slots in every frame: "
                      f"set model.video.mask='tube' (got {v.mask!r}), or keep_ratio=1")
  if config.model.contrastive_head == "identity" and not (
      video_out == text_out == config.model.embed_dim):
    raise ConfigError(f"model.contrastive_head='identity' compares the towers' outputs: the "
                      f"video tower gives {video_out} (model.video.proj_dim or width), the text "
                      f"tower {text_out} (model.text.proj_dim or width), model.embed_dim is "
                      f"{config.model.embed_dim}; they must be equal")
  for name in ("video", "text"):
    if config.model[name].proj_dim < 0:
      raise ConfigError(f"model.{name}.proj_dim={config.model[name].proj_dim} must be >= 0")
  if config.model.attention == "cudnn" and (problem := cudnn_attention_problem(config)):
    raise ConfigError(f"model.attention='cudnn': {problem}")  # 'auto' falls back to 'xla'
  if d.text_len < 2:
    raise ConfigError(f"data.text_len={d.text_len} must be at least 2")
  positions = config.model.text.max_positions
  if positions < 0 or (positions and d.text_len > positions):
    raise ConfigError(f"data.text_len={d.text_len} exceeds model.text.max_positions="
                      f"{positions}, the text tower's position table (0: as long as text_len)")
  for name in ("threads", "parallel_calls", "prefetch_batches"):
    if d[name] < 0:
      raise ConfigError(f"data.{name}={d[name]} must be >= 0 (0: automatic)")
  if d.samples_per_visit < 1:
    raise ConfigError(f"data.samples_per_visit={d.samples_per_visit} must be >= 1")
  _choice("demo.generator_version", config.demo.generator_version, (2, 3))
  if d.min_video_seconds < 0:
    raise ConfigError(f"data.min_video_seconds={d.min_video_seconds} must be >= 0")
  if not d.clip_seconds or min(d.clip_seconds) <= 0:
    raise ConfigError(f"data.clip_seconds={d.clip_seconds} must be positive lengths")
  for rule in config.optim.param_groups:
    ok = (isinstance(rule, (tuple, list)) and len(rule) == 3 and isinstance(rule[0], str)
          and all(isinstance(x, (int, float)) and x >= 0 for x in rule[1:]))
    if not ok:
      raise ConfigError(f"optim.param_groups rule {rule!r}: expected (regex, lr_multiplier >= 0, "
                        "weight_decay >= 0)")
    try:
      re.compile(rule[0])
    except re.error as e:
      raise ConfigError(f"optim.param_groups rule {rule[0]!r} is not a regex: {e}") from None
  for kind, path in init_sources(config.init_from):
    if kind not in INIT_KINDS or not path:
      raise ConfigError(f"init_from={config.init_from!r}: {kind + ':' + path!r} is not one of "
                        f"{[k + ':PATH' for k in INIT_KINDS]} (comma-separated, applied in order)")
  if config.mesh.fsdp < 1 or (config.mesh.data < 1 and config.mesh.data != -1):
    raise ConfigError(f"mesh={config.mesh}; data is -1 or >= 1 and fsdp >= 1")
  return config


def output_widths(config) -> tuple[int, int]:
  """(video, text) output widths of the towers: their proj_dim when set, else their width."""
  v, t = config.model.video, config.model.text
  return v.proj_dim or v.width, t.proj_dim or t.width


def init_sources(init_from: str) -> list[tuple[str, str]]:
  """'mae:/a.pth,distilbert:/b' -> [('mae', '/a.pth'), ('distilbert', '/b')].

  A comma starts a new source only when a `KIND:` follows it, so paths may hold commas.
  """
  if not init_from.strip():
    return []
  parts = re.split(r",(?=\s*\w+:)", init_from)
  return [tuple(p.strip().partition(":")[::2]) for p in parts]  # type: ignore[misc]


def num_tokens_per_slice(config) -> int:
  """Patches per tubelet slice, before token keeping."""
  return (config.data.image_size // config.model.video.patch_size) ** 2


def num_kept_per_slice(config) -> int:
  """Patches kept per tubelet slice during training (at least one)."""
  return max(1, int(round(num_tokens_per_slice(config) * config.model.video.keep_ratio)))
