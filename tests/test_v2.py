"""TVTSv2: divided space-time attention, the CLIP towers, their imports, against PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from configs import tiny  # noqa: E402  pylint: disable=g-import-not-at-top
from data_pipelines import tokenizer as tok_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from tvts_jax import config_schema, convert  # noqa: E402  pylint: disable=g-import-not-at-top
from tvts_jax.models import layers, video_vit  # noqa: E402  pylint: disable=g-import-not-at-top
from tvts_jax.models import tvts as tvts_model  # noqa: E402  pylint: disable=g-import-not-at-top
import test_convert  # noqa: E402  pylint: disable=g-import-not-at-top

nn = torch.nn
MEAN, STD = video_vit.IMAGENET_MEAN, video_vit.IMAGENET_STD
# A tiny CLIP BPE vocabulary: single characters, word-final characters, a few merges.
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
_MERGES = [("t", "h"), ("th", "e</w>"), ("o", "n"), ("on", "ion</w>"), ("c", "u"), ("cu", "t"),
           ("i", "o"), ("io", "n</w>")]
_VOCAB = {t: i for i, t in enumerate(list(_CHARS) + [c + "</w>" for c in _CHARS] +
                                      list(dict.fromkeys(a + b for a, b in _MERGES)))}
_VOCAB.update({"<|startoftext|>": len(_VOCAB), "<|endoftext|>": len(_VOCAB) + 1})
SOT, EOT = len(_VOCAB) - 2, len(_VOCAB) - 1


def _v2_config(**overrides):
  c = tiny.get_config()
  c.model.video.update(tubelet=1, attention_layout="divided", mask="tube", patch_bias=False,
                       ln_pre=True, activation="quick_gelu", proj_dim=16, keep_ratio=0.5,
                       ln_eps=1e-5, temporal_init="normal", temporal_init_std=32 ** -0.5)
  c.model.text.update(arch="clip", vocab_size=len(_VOCAB), width=32, depth=2, num_heads=2,
                      mlp_dim=64, max_positions=8, proj_dim=16, ln_eps=1e-5)
  c.model.update(embed_dim=16, contrastive_head="identity")
  c.update_from_flattened_dict(overrides)
  return config_schema.validate(c)


def _clip_ids(rng, batch, length=8):
  """[SOT, words..., EOT] then EOT padding, as CLIP's tokenizer writes them, with their mask."""
  lengths = rng.integers(2, length + 1, batch)
  ids = np.full((batch, length), EOT, np.int32)
  for i, n in enumerate(lengths):
    ids[i, 0], ids[i, 1:n - 1], ids[i, n - 1] = SOT, rng.integers(0, SOT, n - 2), EOT
  return ids, np.arange(length) < lengths[:, None]


# ---------------------------------------------------------------------------------------------
# Divided space-time attention.


@pytest.mark.parametrize("kind", ["time", "space"])
def test_divided_attention_sees_its_slot_or_its_frame_and_the_cls(kind):
  frames, n, d = 3, 4, 8
  attn = layers.Attention(d, 2, dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 1 + frames * n, d))
  base = attn(x, groups=(kind, frames))
  token = lambda f, s: 1 + f * n + s
  changed = lambda y: set(np.nonzero(np.abs(np.asarray(y - base))[0].max(-1) > 1e-6)[0])
  # A patch (frame 1, slot 2) reaches the CLS and its own group: the same slot in every
  # frame (time), or every slot of its frame (space); nothing else.
  moved = changed(attn(x.at[0, token(1, 2)].add(1.0), groups=(kind, frames)))
  group = ({token(f, 2) for f in range(frames)} if kind == "time"
           else {token(1, s) for s in range(n)})
  assert moved == {0} | group
  # The CLS is a key of every group, and attends to everything itself.
  assert changed(attn(x.at[0, 0].add(1.0), groups=(kind, frames))) == set(range(1 + frames * n))


def test_divided_block_temporal_attention_is_zero_at_init_and_learns():
  frames, n, d = 3, 4, 8
  block = layers.Block(d, 2, 16, ln_eps=1e-5, temporal_frames=frames, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 1 + frames * n, d))
  out = block.time_attn(block.time_norm(x), groups=("time", frames))
  assert float(jnp.max(jnp.abs(out))) == 0.0  # exactly
  # With q = k = v = 0 only the values move the output: their columns of qkv get a gradient
  # (through the all-ones projection), the query and key columns none yet.
  graphdef, params = nnx.split(block)
  grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2))(params)
  qkv = np.abs(np.asarray(grads["time_attn"]["qkv"]["kernel"][...]))
  assert qkv[:, :2 * d].max() == 0.0 and qkv[:, 2 * d:].min() > 0


def test_divided_needs_a_tube_mask_and_identity_needs_equal_widths():
  with pytest.raises(config_schema.ConfigError, match="set model.video.mask='tube'"):
    _v2_config(**{"model.video.mask": "per_slice"})
  _v2_config(**{"model.video.mask": "per_slice", "model.video.keep_ratio": 1.0})  # no keeping
  with pytest.raises(config_schema.ConfigError, match="video tower gives 24 .* the text tower "
                                                      "16"):
    _v2_config(**{"model.video.proj_dim": 24})


def test_tube_mask_keeps_the_same_patches_in_every_frame():
  idx = video_vit.sample_kept_indices(jax.random.key(0), 3, 4, 16, 8, tube=True)
  assert idx.shape == (3, 4, 8)
  np.testing.assert_array_equal(idx, np.broadcast_to(idx[:, :1], idx.shape))
  assert len({tuple(r) for r in np.asarray(idx[:, 0])}) == 3  # each sample its own


# ---------------------------------------------------------------------------------------------
# CLIP: the towers and the tokenizer against transformers.


def _hf_clip(config):
  v, t = config.model.video, config.model.text
  hf = transformers.CLIPModel(transformers.CLIPConfig(
      text_config=dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim,
                       num_hidden_layers=t.depth, num_attention_heads=t.num_heads,
                       max_position_embeddings=t.max_positions, bos_token_id=SOT,
                       eos_token_id=EOT, pad_token_id=EOT, layer_norm_eps=t.ln_eps),
      vision_config=dict(hidden_size=v.width, intermediate_size=v.mlp_dim,
                         num_hidden_layers=v.depth, num_attention_heads=v.num_heads,
                         image_size=config.data.image_size, patch_size=v.patch_size,
                         layer_norm_eps=v.ln_eps),
      projection_dim=v.proj_dim)).eval()
  torch.manual_seed(0)
  with torch.no_grad():  # LayerNorms away from their init, so that a swapped one would show
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.add_(torch.randn_like(p) * 0.1)
  return hf


def _pooled(out):
  return (out.pooler_output if hasattr(out, "pooler_output") else out).numpy()


def test_clip_towers_equal_transformers_clip(tmp_path):
  config = _v2_config(**{"data.num_frames": 1, "model.video.temporal_init": "zeros"})
  hf = _hf_clip(config)
  hf.save_pretrained(str(tmp_path / "clip"))
  config.init_from = f"clip:{tmp_path / 'clip'}"
  graphdef, params = nnx.split(tvts_model.build_model(config))
  reports = []
  model = nnx.merge(graphdef, convert.load_init(config, params, reports))
  (_, report), = reports
  assert report.skipped.keys() == {"logit_scale"}
  # Kept at init: the temporal parts and the sorter (nothing of CLIP's is left out).
  assert {"/".join(p.split("/")[:2]) for p in report.kept_init} == {
      "video/temporal_embed", "video/blocks", "sorter/type_embed", "sorter/blocks",
      "sorter/norm", "sorter/head"}
  assert all("time_" in p for p in report.kept_init if p.startswith("video/blocks"))

  rng = np.random.default_rng(0)
  ids, mask = _clip_ids(rng, 5)
  ours = model.encode_text(jnp.asarray(ids)[:, None], jnp.asarray(mask)[:, None])[:, 0]
  with torch.no_grad():
    ref = _pooled(hf.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                       attention_mask=torch.from_numpy(mask).long()))
  np.testing.assert_allclose(ours, ref, atol=1e-5)

  # One frame, its temporal attention at init and a zero temporal embedding: CLIP's image
  # tower (ImageNet statistics, as TVTSv2 normalises).
  video = rng.integers(0, 256, (2, 1, 32, 32, 3)).astype(np.uint8)
  ours = model.video(jnp.asarray(video))[:, 0]
  pixels = ((video[:, 0] - MEAN) / STD).astype(np.float32).transpose(0, 3, 1, 2)
  with torch.no_grad():
    ref = _pooled(hf.get_image_features(pixel_values=torch.from_numpy(pixels)))
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def _clip_tokenizer():
  return transformers.CLIPTokenizerFast(vocab=dict(_VOCAB), merges=list(_MERGES))


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                    reason="CLIPTokenizerFast takes the vocabulary itself from transformers 5")
def test_clip_tokenizer_json_gives_clip_tokenizer_fast_ids(tmp_path):
  fast = _clip_tokenizer()
  fast.save_pretrained(str(tmp_path))
  ours = tok_lib.load(str(tmp_path / "tokenizer.json"))
  texts = ["the onion", "He CUTS the onion 10 times and then some more", "", "um uh cut it"]
  for length in (8, 16):
    ids, mask = ours.encode(texts, length)
    ref = fast(texts, padding="max_length", truncation=True, max_length=length)
    np.testing.assert_array_equal(ids, np.asarray(ref["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(ref["attention_mask"], bool))
    assert (ids[:, 0] == SOT).all()
    # The read-out: the last real token is the end of text, truncated texts included.
    assert (ids[np.arange(len(texts)), mask.sum(1) - 1] == EOT).all()


# ---------------------------------------------------------------------------------------------
# A released TVTSv2 checkpoint: a PyTorch model of its layout (the published code's modules,
# written from their structure), loaded whole.


class _VarAttention(nn.Module):
  """TVTSv2's attention: the CLS attends to all; patches by frame ('space') or slot ('time'),
  each group with the CLS key and value prepended."""

  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x, kind, frames):
    b, s, d = x.shape
    h, hd, n = self.heads, d // self.heads, (s - 1) // frames
    q, k, v = (t.reshape(b, s, h, hd).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
    q = q * hd ** -0.5
    attend = lambda q_, k_, v_: (q_ @ k_.transpose(-2, -1)).softmax(-1) @ v_
    cls = attend(q[:, :, :1], k, v)  # [b, h, 1, hd]

    def group(t):  # [b, h, F*n, hd] -> [b * groups, h, size, hd]
      t = t[:, :, 1:].reshape(b, h, frames, n, hd)
      if kind == "time":
        t = t.transpose(2, 3)
      g, size = t.shape[2], t.shape[3]
      return t.permute(0, 2, 1, 3, 4).reshape(b * g, h, size, hd), g

    (gq, g), (gk, _), (gv, _) = group(q), group(k), group(v)
    ck = k[:, :, :1].repeat_interleave(g, 0)
    cv = v[:, :, :1].repeat_interleave(g, 0)
    out = attend(gq, torch.cat([ck, gk], 2), torch.cat([cv, gv], 2))  # [b*g, h, size, hd]
    out = out.reshape(b, g, h, -1, hd).permute(0, 2, 1, 3, 4)  # [b, h, g, size, hd]
    if kind == "time":
      out = out.transpose(2, 3)
    out = torch.cat([cls, out.reshape(b, h, frames * n, hd)], 2)
    return self.proj(out.transpose(1, 2).reshape(b, s, d))


class _QuickGELU(nn.Module):

  def forward(self, x):
    return x * torch.sigmoid(1.702 * x)


class _Mlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.c_fc, self.gelu, self.c_proj = nn.Linear(dim, hidden), _QuickGELU(), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.c_proj(self.gelu(self.c_fc(x)))


class _SpaceTimeBlock(nn.Module):

  def __init__(self, dim, heads, hidden):
    super().__init__()
    self.attn, self.timeattn = _VarAttention(dim, heads), _VarAttention(dim, heads)
    self.ln_1, self.ln_2, self.ln_3 = (nn.LayerNorm(dim, eps=1e-5) for _ in range(3))
    self.mlp = _Mlp(dim, hidden)

  def forward(self, x, frames):
    t = x + self.timeattn(self.ln_3(x), "time", frames)
    s = x + self.attn(self.ln_1(t), "space", frames)  # the residual is x, not t
    return s + self.mlp(self.ln_2(s))


class _Transformer(nn.Module):

  def __init__(self, blocks):
    super().__init__()
    self.resblocks = nn.ModuleList(blocks)


class _VideoModel(nn.Module):

  def __init__(self, c):
    super().__init__()
    v = c.model.video
    grid, d = (c.data.image_size // v.patch_size) ** 2, v.width
    self.conv1 = nn.Conv2d(3, d, v.patch_size, v.patch_size, bias=False)
    self.class_embedding = nn.Parameter(torch.zeros(d))
    self.positional_embedding = nn.Parameter(torch.zeros(grid + 1, d))
    self.temporal_embedding = nn.Parameter(torch.zeros(6, d))  # more frames than used
    self.ln_pre, self.ln_post = nn.LayerNorm(d, eps=1e-5), nn.LayerNorm(d, eps=1e-5)
    self.transformer = _Transformer([_SpaceTimeBlock(d, v.num_heads, v.mlp_dim)
                                     for _ in range(v.depth)])
    self.proj = nn.Parameter(torch.zeros(d, v.proj_dim))

  def forward(self, video):  # [B, T, 3, H, W]
    b, t = video.shape[:2]
    x = self.conv1(video.flatten(0, 1)).flatten(2).transpose(1, 2)  # [B*T, N, D]
    n = x.shape[1]
    x = x.reshape(b, t * n, -1) + self.positional_embedding[1:].repeat(t, 1) + \
        self.temporal_embedding[:t].repeat_interleave(n, 0)
    cls = (self.class_embedding + self.positional_embedding[0]).expand(b, 1, -1)
    x = self.ln_pre(torch.cat([cls, x], 1))
    for blk in self.transformer.resblocks:
      x = blk(x, t)
    return self.ln_post(x) @ self.proj


class _TextBlock(nn.Module):
  """OpenAI CLIP's residual block: nn.MultiheadAttention (in_proj_weight), causal."""

  def __init__(self, dim, heads, hidden):
    super().__init__()
    self.attn = nn.MultiheadAttention(dim, heads)
    self.ln_1, self.ln_2 = nn.LayerNorm(dim, eps=1e-5), nn.LayerNorm(dim, eps=1e-5)
    self.mlp = _Mlp(dim, hidden)

  def forward(self, x, causal):  # [L, B, D]
    h = self.ln_1(x)
    x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
    return x + self.mlp(self.ln_2(x))


class _TVTSv2(nn.Module):

  def __init__(self, c):
    super().__init__()
    t = c.model.text
    self.video_model = _VideoModel(c)
    self.text_model = _Transformer([_TextBlock(t.width, t.num_heads, t.mlp_dim)
                                    for _ in range(t.depth)])
    self.text_token_embedding = nn.Embedding(t.vocab_size, t.width)
    self.text_positional_embedding = nn.Parameter(torch.zeros(t.max_positions, t.width))
    self.text_ln_final = nn.LayerNorm(t.width, eps=1e-5)
    self.text_projection = nn.Parameter(torch.zeros(t.width, t.proj_dim))
    s = c.model.sorter
    self.pred_model = test_convert._SortTransformer(  # pylint: disable=protected-access
        c.model.video.proj_dim, s.depth, s.num_heads, s.mlp_dim, c.data.num_clips)

  def encode_text(self, ids):  # [B, L]: the feature at the end of text (the largest id)
    length = ids.shape[1]
    causal = torch.full((length, length), float("-inf")).triu(1)
    x = (self.text_token_embedding(ids) + self.text_positional_embedding).transpose(0, 1)
    for blk in self.text_model.resblocks:
      x = blk(x, causal)
    x = self.text_ln_final(x.transpose(0, 1))
    return x[torch.arange(ids.shape[0]), ids.argmax(-1)] @ self.text_projection


def test_tvts_v2_checkpoint_loads_whole_and_matches_its_pytorch_model(tmp_path):
  config = _v2_config()
  ref = test_convert._randomize(_TVTSv2(config), seed=2)  # pylint: disable=protected-access
  state = test_convert._DDP(ref).state_dict()  # pylint: disable=protected-access
  path = str(tmp_path / "TVTSv2.pth")
  # As the trainer saves it: the pickled config object is refused, with the re-save recipe.
  torch.save({"state_dict": state, "config": _Unpicklable(), "epoch": 3}, path)
  config.init_from = f"tvts_v2_torch:{path}"
  graphdef, params = nnx.split(tvts_model.build_model(config))
  with pytest.raises(convert.ConversionError, match=r"weights-only loader refused.*'state_dict'"):
    convert.load_init(config, params)
  torch.save({"state_dict": state}, path)
  reports = []
  model = nnx.merge(graphdef, convert.load_init(config, params, reports))
  (_, report), = reports
  assert not report.skipped and report.kept_init == []  # every parameter, nothing at init

  rng = np.random.default_rng(0)
  video = rng.integers(0, 256, (2, 4, 32, 32, 3)).astype(np.uint8)
  ids, mask = _clip_ids(rng, 8)
  with torch.no_grad():
    pixels = ((video - MEAN) / STD).astype(np.float32).transpose(0, 1, 4, 2, 3)
    tokens = ref.video_model(torch.from_numpy(pixels))
    text = ref.encode_text(torch.from_numpy(ids).long()).reshape(2, 4, -1)
    logits = ref.pred_model(text, tokens)
  out = model(jnp.asarray(video), jnp.asarray(ids).reshape(2, 4, 8),
              jnp.asarray(mask).reshape(2, 4, 8))
  np.testing.assert_allclose(out["video_tokens"], tokens.numpy(), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(out["text_features"], text.numpy(), atol=1e-5)
  np.testing.assert_allclose(out["sort_logits"], logits.numpy(), atol=1e-4, rtol=1e-4)


class _Unpicklable:
  """Stands for the trainer's pickled ConfigParser: an object weights-only loading refuses."""


def test_tiny_divided_step_on_1_and_8_devices_agrees():
  from tvts_jax import train  # pylint: disable=g-import-not-at-top
  import test_train  # pylint: disable=g-import-not-at-top
  config = _v2_config(**{"optim.eps": 1e-4})
  batch = test_train._random_batch(config)  # pylint: disable=protected-access
  results = []
  for data, fsdp, n in ((1, 1, 1), (4, 2, 8)):
    trainer = train.Trainer(config, test_train._mesh(data, fsdp, n))  # pylint: disable=protected-access
    losses = [float(trainer.step(batch)["loss"]) for _ in range(3)]
    results.append((losses, jax.device_get(trainer.state["params"])))
  (l1, p1), (l8, p8) = results
  np.testing.assert_allclose(l1, l8, rtol=2e-5)
  assert l1[2] != l1[0]
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=5e-5)  # as test_train.test_step_on_1_and_8_devices_agree


def test_v2_b16_config_groups_are_the_published_ones():
  """configs/tvts_v2_b16.py: which weights train at 1e-4, which at 1e-7, which are frozen, and
  where weight decay applies (the published recipe's name rules)."""
  from configs import tvts_v2_b16  # pylint: disable=g-import-not-at-top
  from tvts_jax import optim  # pylint: disable=g-import-not-at-top
  config = tvts_v2_b16.get_config()
  params = tvts_model.abstract_model(config)[1].to_pure_dict()
  labels = optim.param_labels(config, params)
  rule = lambda path: config.optim.param_groups[int(_at(labels, path))][1:]
  expect = {
      "text/blocks/layers/8/mlp/fc1/kernel": (0.0, 0.0),  # frozen
      "text/blocks/layers/8/norm1/scale": (0.0, 0.0),
      "text/blocks/layers/9/attn/qkv/kernel": (1e-3, 0.05),
      "text/blocks/layers/11/norm2/bias": (1e-3, 0.0),
      "text/token_embed/embedding": (1e-3, 0.05),
      "text/proj/kernel": (1e-3, 0.05),
      "text/norm/scale": (1e-3, 0.0),
      "video/temporal_embed": (1e-3, 0.05),  # random at init, yet in CLIP's group (published)
      "video/cls_token": (1e-3, 0.05),
      "video/pos_embed": (1e-3, 0.05),
      "video/ln_pre/scale": (1e-3, 0.0),
      "video/blocks/layers/3/attn/qkv/kernel": (1e-3, 0.05),
      "video/blocks/layers/3/time_attn/qkv/kernel": (1.0, 0.05),
      "video/blocks/layers/3/time_attn/proj/bias": (1.0, 0.0),
      "video/blocks/layers/3/time_norm/scale": (1.0, 0.0),
      "video/proj/kernel": (1e-3, 0.05),
      "sorter/type_embed": (1.0, 0.05),
      "sorter/blocks/layers/1/norm2/scale": (1.0, 0.0),
      "sorter/head/kernel": (1.0, 0.05),
      "sorter/head/bias": (1.0, 0.0),
  }
  assert {p: rule(p) for p in expect} == expect
  lines = optim.describe_groups(config, params)
  assert len(lines) == 5 and "frozen" in lines[0]
  assert config.optim.lr * 1e-3 == pytest.approx(1e-7) and config.optim.eps == 1e-6


def _at(tree, path):
  for key in path.split("/"):
    tree = tree[int(key) if key.isdigit() else key]
  return tree
