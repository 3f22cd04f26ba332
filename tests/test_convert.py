"""Importing PyTorch weights: MAE/timm ViT and the reference TVTS layout, against PyTorch.

timm imports torchvision, which crashes the interpreter when TensorFlow (imported by conftest)
was imported first; so the timm model is built, saved and run in a subprocess without
TensorFlow, and this process compares against what it wrote.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import numpy as st_numpy

torch = pytest.importorskip("torch")

from configs import tiny  # noqa: E402  pylint: disable=g-import-not-at-top
from tvts_jax import convert  # noqa: E402  pylint: disable=g-import-not-at-top
from tvts_jax.convert import state_dict as sd_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from tvts_jax.models import tvts as tvts_model  # noqa: E402  pylint: disable=g-import-not-at-top
from tvts_jax.models import video_vit  # noqa: E402  pylint: disable=g-import-not-at-top

nn = torch.nn
MEAN, STD = video_vit.IMAGENET_MEAN, video_vit.IMAGENET_STD
_LN_WEIGHTS = ("norm1.weight", "norm2.weight", "norm.weight")


def _randomize(module, seed):
  """Random weights everywhere (LayerNorm scales around 1), so every mapping is exercised."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * 0.2
      p.copy_(1.0 + noise if name.endswith(_LN_WEIGHTS) else noise)
  return module.eval()


def _config(**video):
  c = tiny.get_config()
  c.model.video.update(video)
  return c


def _ours(config, init_from):
  config.init_from = init_from
  model = tvts_model.build_model(config)
  graphdef, params = nnx.split(model)
  return nnx.merge(graphdef, convert.load_init(config, params))


_TIMM_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from safetensors import torch as st_torch
    from timm.models.vision_transformer import VisionTransformer
    out = sys.argv[1]
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                            mlp_ratio=2.0, qkv_bias=True, num_classes=0).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
      for name, p in vit.named_parameters():
        noise = torch.randn(p.shape, generator=gen) * 0.2
        p.copy_(1.0 + noise if name.endswith(%r) else noise)
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    st_torch.save_file(state, out + "/mae.safetensors")
    # The MAE release's layout: tensors under 'model', plus pretraining extras.
    extras = {"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.zeros(16, 32)}
    torch.save({"model": {**state, **extras}, "epoch": 7}, out + "/mae.pth")
    x = torch.from_numpy(np.load(out + "/input.npy"))
    with torch.no_grad():
      np.save(out + "/features.npy", vit.forward_features(x).numpy())
""" % (_LN_WEIGHTS,))


@pytest.fixture(scope="module")
def timm_files(tmp_path_factory):
  """A random tiny timm ViT saved as .safetensors and MAE-style .pth, and its features."""
  if importlib.util.find_spec("timm") is None:  # find_spec: importing it here would crash
    pytest.skip("timm is not installed")
  out = tmp_path_factory.mktemp("timm")
  image = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
  np.save(out / "input.npy", ((image - MEAN) / STD).transpose(0, 3, 1, 2).astype(np.float32))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  subprocess.run([sys.executable, "-c", _TIMM_SCRIPT, str(out)], check=True, env=env,
                 capture_output=True, timeout=300)
  return dict(pth=str(out / "mae.pth"), safetensors=str(out / "mae.safetensors"), image=image,
              features=np.load(out / "features.npy"),
              state=st_numpy.load_file(str(out / "mae.safetensors")))


def _save_numpy(tmp_path, state, name):
  path = str(tmp_path / f"{name}.safetensors")
  st_numpy.save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
  return path


def _save(tmp_path, state, name, wrap=None):
  """Writes a torch state dict as .pth (optionally wrapped, like real files) and .safetensors."""
  from safetensors import torch as st_torch  # pylint: disable=g-import-not-at-top
  state = {k: v.detach().clone().contiguous() for k, v in state.items()}
  pth = tmp_path / f"{name}.pth"
  torch.save({wrap: state, "epoch": 7} if wrap else state, pth)
  st = tmp_path / f"{name}.safetensors"
  st_torch.save_file(state, st)
  return str(pth), str(st)


# ---------------------------------------------------------------------------------------------
# MAE / timm.


def test_mae_matches_timm_forward(timm_files):
  # num_frames = tubelet = 2: one temporal slice. The kernel is copied onto both time steps
  # (not divided), so with the ImageNet mean (0 after normalisation) as the second frame our
  # tubelet embedding is exactly timm's 2-D patch embedding of the first frame.
  config = _config()
  config.data.num_frames = 2
  model = _ours(config, f"mae:{timm_files['pth']}")
  image = timm_files["image"]
  video = np.stack([image, np.broadcast_to(MEAN, image.shape)], axis=1)
  ours = np.asarray(model.video(jnp.asarray(video)))
  assert ours.shape == timm_files["features"].shape == (2, 1 + 16, 32)
  np.testing.assert_allclose(ours, timm_files["features"], atol=1e-4, rtol=1e-4)


def test_scanned_layout_gets_the_blocks_stacked(timm_files):
  config = _config()
  config.model.scan_layers = True
  config.init_from = f"mae:{timm_files['safetensors']}"
  abstract = nnx.split(nnx.eval_shape(lambda: tvts_model.build_model(config)))[1]
  params = convert.load_init(config, abstract)
  qkv = params["video"]["blocks"]["layers"]["attn"]["qkv"]["kernel"][...]
  assert qkv.shape == (2, 32, 96)
  for i in range(2):
    np.testing.assert_array_equal(qkv[i], timm_files["state"][f"blocks.{i}.attn.qkv.weight"].T)


def test_mae_kernel_copied_not_divided_and_rest_kept(timm_files):
  config = _config()
  fresh = tvts_model.build_model(config)
  model = _ours(config, f"mae:{timm_files['safetensors']}")
  state = timm_files["state"]
  kernel = np.asarray(model.video.patch_embed.kernel[...])
  w2d = state["patch_embed.proj.weight"].transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(kernel[0], w2d)
  np.testing.assert_array_equal(kernel[1], w2d)
  np.testing.assert_array_equal(model.video.blocks.layers[1].attn.qkv.kernel[...],
                                state["blocks.1.attn.qkv.weight"].T)
  # Not in MAE: the temporal embedding, the text tower, the sorter keep their init.
  np.testing.assert_array_equal(model.video.temporal_embed[...], fresh.video.temporal_embed[...])
  np.testing.assert_array_equal(model.sorter.head.kernel[...], fresh.sorter.head.kernel[...])
  np.testing.assert_array_equal(model.text.token_embed.embedding[...],
                                fresh.text.token_embed.embedding[...])


def test_pth_and_safetensors_give_the_same_weights(timm_files):
  a = sd_lib.load_state_dict(timm_files["pth"])  # unwrapped from 'model'
  b = sd_lib.load_state_dict(timm_files["safetensors"])
  assert set(a) - set(b) == {"mask_token", "decoder_embed.weight"}
  for k in b:
    np.testing.assert_array_equal(a[k], b[k])


def test_mae_extras_are_reported_not_converted(timm_files):
  _, report = convert.CONVERTERS["mae"](timm_files["pth"], _config())
  assert report.skipped == {"decoder_": ["decoder_embed.weight"], "mask_token": ["mask_token"]}
  assert report.mapped["blocks.0.attn.qkv.weight"] == "video/blocks/layers/0/attn/qkv/kernel"


def test_pos_embed_resized_to_a_larger_grid(timm_files, tmp_path):
  state = dict(timm_files["state"])
  pos = np.zeros((1, 17, 32), np.float32)
  pos[0, 1:] = np.repeat(np.arange(4, dtype=np.float32), 4)[:, None]  # varies along rows only
  pos[0, 0] = 5.0
  state["pos_embed"] = pos
  path = _save_numpy(tmp_path, state, "rows")
  config = _config()
  config.data.update(image_size=48, resize_short=48)  # 4 x 4 grid -> 6 x 6
  resized = np.asarray(_ours(config, f"mae:{path}").video.pos_embed[...])
  assert resized.shape == (1, 37, 32)
  np.testing.assert_array_equal(resized[0, 0], 5.0)  # the CLS slot is kept
  grid = resized[0, 1:, 0].reshape(6, 6)
  np.testing.assert_allclose(grid, grid[:, :1].repeat(6, 1), atol=1e-5)  # still rows only
  assert np.all(np.diff(grid[:, 0]) > 0) and grid[0, 0] < 0.5 and grid[-1, 0] > 2.5


def test_missing_unexpected_and_misshaped_keys_are_named(timm_files, tmp_path):
  state = timm_files["state"]
  mae = lambda path, config: convert.CONVERTERS["mae"](path, config)
  missing = {k: v for k, v in state.items() if k != "blocks.1.mlp.fc2.bias"}
  with pytest.raises(convert.ConversionError, match=r"missing key 'blocks\.1\.mlp\.fc2\.bias'"):
    mae(_save_numpy(tmp_path, missing, "missing"), _config())

  extra = dict(state, **{"blocks.0.ls1.gamma": np.ones(32, np.float32)})
  with pytest.raises(convert.ConversionError, match=r"unexpected.*blocks\.0\.ls1\.gamma"):
    mae(_save_numpy(tmp_path, extra, "extra"), _config())

  path = timm_files["safetensors"]
  with pytest.raises(convert.ConversionError,
                     match=r"'patch_embed\.proj\.weight' has shape \(32, 3, 8, 8\).*"
                     r"\(48, 3, 8, 8\)"):
    mae(path, _config(width=48))
  with pytest.raises(convert.ConversionError, match=r"2 blocks under 'blocks\.'.*builds 3"):
    mae(path, _config(depth=3))


_UNPICKLED = []


def _mark_unpickled():
  _UNPICKLED.append(True)
  return {}


class _TrainingConfig:
  """Stands for the reference's pickled ConfigParser: running its pickle would run code."""

  def __reduce__(self):
    return (_mark_unpickled, ())


def test_arbitrary_pickles_are_refused_not_run(tmp_path):
  path = tmp_path / "ckpt.pth"
  torch.save({"model": {"cls_token": torch.zeros(1, 1, 32)}, "config": _TrainingConfig()}, path)
  with pytest.raises(convert.ConversionError, match="weights-only"):
    sd_lib.load_state_dict(str(path))
  assert not _UNPICKLED


def test_torch_missing_is_a_clear_error(tmp_path, monkeypatch):
  pth, _ = _save(tmp_path, {"cls_token": torch.zeros(1, 1, 32)}, "mae")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match=r"needs PyTorch.*safetensors"):
    sd_lib.load_state_dict(pth)


def test_init_from_keeps_shardings():
  config = _config()
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  params = nnx.split(tvts_model.build_model(config))[1]
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = jax.device_put(params, replicated)
  converted = {"video": {"norm": {"scale": np.full((32,), 3.0, np.float32)}}}
  out = convert.merge_into_params(params, converted, config)
  leaf = out["video"]["norm"]["scale"][...]
  assert leaf.sharding == replicated
  np.testing.assert_array_equal(leaf, 3.0)
  assert float(params["video"]["norm"]["scale"][...][0]) == 1.0  # the input is untouched


# ---------------------------------------------------------------------------------------------
# The reference TVTS layout: a PyTorch re-implementation of v1's modules, written from the
# reference code's structure (names and shapes are what the converter maps).


class _Attention(nn.Module):

  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5).softmax(-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):

  def __init__(self, dim, heads, hidden):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = _Attention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = _Mlp(dim, hidden)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):

  def __init__(self, dim, tubelet, patch):
    super().__init__()
    self.proj = nn.Conv3d(3, dim, (tubelet, patch, patch), stride=(tubelet, patch, patch))


class _VideoModel(nn.Module):
  """v1/model/video_encoder.py's VisionTransformer, without token dropping."""

  def __init__(self, dim, depth, heads, hidden, tubelet, patch, grid, tubes):
    super().__init__()
    self.patch_embed = _PatchEmbed(dim, tubelet, patch)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, grid + 1, dim))
    self.temporal_embed = nn.Parameter(torch.zeros(1, tubes, dim))
    self.blocks = nn.ModuleList([_Block(dim, heads, hidden) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)

  def forward(self, x):  # x [B, C, T, H, W]
    b = x.shape[0]
    x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tubes, grid = self.temporal_embed.shape[1], self.pos_embed.shape[1] - 1
    pos = self.pos_embed[:, 1:].repeat(1, tubes, 1) + \
        self.temporal_embed.repeat_interleave(grid, 1)
    x = torch.cat([self.cls_token.expand(b, -1, -1) + self.pos_embed[:, :1], x + pos], 1)
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x)


class _SortTransformer(nn.Module):

  def __init__(self, dim, depth, heads, hidden, num_classes):
    super().__init__()
    self.type_embed = nn.Parameter(torch.zeros(1, 2, dim))
    self.blocks = nn.ModuleList([_Block(dim, heads, hidden) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.head = nn.Linear(dim, num_classes)

  def forward(self, text, x):
    n = x.shape[1]
    x = torch.cat([x + self.type_embed[:, 0:1], text + self.type_embed[:, 1:2]], 1)
    for blk in self.blocks:
      x = blk(x)
    return self.head(self.norm(x[:, n:]))


class _TVTS(nn.Module):

  def __init__(self, c):
    super().__init__()
    v, s, t = c.model.video, c.model.sorter, c.model.text
    grid = (c.data.image_size // v.patch_size) ** 2
    self.video_model = _VideoModel(v.width, v.depth, v.num_heads, v.mlp_dim, v.tubelet,
                                   v.patch_size, grid, c.data.num_frames // v.tubelet)
    if t.arch == "distilbert":  # the reference's: transformers' AutoModel of DistilBERT
      import transformers  # pylint: disable=g-import-not-at-top
      self.text_model = transformers.DistilBertModel(transformers.DistilBertConfig(
          vocab_size=t.vocab_size, dim=t.width, n_layers=t.depth, n_heads=t.num_heads,
          hidden_dim=t.mlp_dim, max_position_embeddings=t.max_positions)).eval()
    else:
      self.text_model = nn.Embedding(10, t.width)  # stands for DistilBERT: not mapped
    self.txt_proj = nn.Sequential(nn.ReLU(), nn.Linear(c.model.text.width, c.model.embed_dim))
    self.vid_proj = nn.Sequential(nn.Linear(v.width, c.model.embed_dim))
    self.pred_model = _SortTransformer(v.width, s.depth, s.num_heads, s.mlp_dim,
                                       c.data.num_clips)


class _DDP(nn.Module):
  """Gives the `module.` prefix of a DistributedDataParallel state dict."""

  def __init__(self, module):
    super().__init__()
    self.module = module


def _reference(config):
  ref = _DDP(_TVTS(config))
  _randomize(ref, seed=1)
  return ref.module


def test_tvts_torch_matches_reference_forward(tmp_path):
  config = _config()
  config.model.sorter.depth = 2  # the reference's sorter depth
  ref = _reference(config)
  pth, _ = _save(tmp_path, _DDP(ref).state_dict(), "tvts", wrap="state_dict")
  model = _ours(config, f"tvts_torch:{pth}")

  rng = np.random.default_rng(0)
  video = rng.integers(0, 256, (2, 4, 32, 32, 3)).astype(np.uint8)
  text = rng.normal(size=(2, 4, 32)).astype(np.float32)
  with torch.no_grad():
    x = torch.from_numpy(((video - MEAN) / STD).astype(np.float32).transpose(0, 4, 1, 2, 3))
    tokens = ref.video_model(x)
    logits = ref.pred_model(torch.from_numpy(text), tokens)
    vid = ref.vid_proj(tokens[:, 0])
    txt = ref.txt_proj(torch.from_numpy(text))
  ours_tokens = model.video(jnp.asarray(video))
  np.testing.assert_allclose(ours_tokens, tokens.numpy(), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(model.sorter(jnp.asarray(tokens.numpy()), jnp.asarray(text)),
                             logits.numpy(), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(model.video_proj(jnp.asarray(tokens.numpy()[:, 0])), vid.numpy(),
                             atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(model.text_proj(jax.nn.relu(jnp.asarray(text))), txt.numpy(),
                             atol=1e-4, rtol=1e-4)


def test_tvts_torch_reports_the_text_model_and_rejects_unknown_keys(tmp_path):
  config = _config()
  config.model.sorter.depth = 2
  ref = _reference(config)
  state = _DDP(ref).state_dict()
  _, st = _save(tmp_path, state, "tvts")
  converted, report = convert.CONVERTERS["tvts_torch"](st, config)
  text_keys = [k for k in state if k.startswith("module.text_model.")]
  assert report.skipped == {"text_model.": [k[len("module."):] for k in text_keys]}
  assert "1 tensors under 'text_model.' not converted" in report.summary()
  assert report.mapped["pred_model.head.weight"] == "sorter/head/kernel"
  assert converted["sorter"]["type_embed"].shape == (2, 32)

  bad = dict(state, **{"module.pred_model.pos_embed": torch.zeros(1, 4, 32)})
  _, st = _save(tmp_path, bad, "bad")
  with pytest.raises(convert.ConversionError, match=r"pred_model\.pos_embed"):
    convert.CONVERTERS["tvts_torch"](st, config)

  bad = dict(state, **{"module.pred_model.head.weight": torch.zeros(5, 32)})
  _, st = _save(tmp_path, bad, "bad2")
  with pytest.raises(convert.ConversionError,
                     match=r"'pred_model\.head\.weight' has shape \(5, 32\).*\(4, 32\)"):
    convert.CONVERTERS["tvts_torch"](st, config)


def test_unknown_init_from_kind():
  with pytest.raises(convert.ConversionError, match="mae:PATH"):
    convert.parse_init_from("bert:/x.pth")


def test_a_reference_checkpoint_with_its_distilbert_loads_whole(tmp_path):
  """Video tower, DistilBERT, sorter and projections: our text features and sort logits equal
  the PyTorch model's on the same inputs."""
  pytest.importorskip("transformers")
  config = _config()
  config.model.sorter.depth = 2
  config.model.text.update(arch="distilbert", vocab_size=40, max_positions=16, ln_eps=1e-12)
  ref = _reference(config)
  pth, _ = _save(tmp_path, _DDP(ref).state_dict(), "tvts", wrap="state_dict")
  config.init_from = f"tvts_torch:{pth}"
  model = tvts_model.build_model(config)
  graphdef, params = nnx.split(model)
  reports = []
  model = nnx.merge(graphdef, convert.load_init(config, params, reports))
  (_, report), = reports
  assert not report.skipped and report.kept_init == []  # all of it, nothing left at init

  rng = np.random.default_rng(0)
  video = rng.integers(0, 256, (2, 4, 32, 32, 3)).astype(np.uint8)
  ids = rng.integers(5, 40, (2, 4, 8)).astype(np.int32)
  mask = np.arange(8) < rng.integers(1, 9, (2, 4, 1))
  ids = np.where(mask, ids, 0).astype(np.int32)
  out = model(jnp.asarray(video), jnp.asarray(ids), jnp.asarray(mask))
  with torch.no_grad():
    x = torch.from_numpy(((video - MEAN) / STD).astype(np.float32).transpose(0, 4, 1, 2, 3))
    tokens = ref.video_model(x)
    text = ref.text_model(input_ids=torch.from_numpy(ids.reshape(8, 8)).long(),
                          attention_mask=torch.from_numpy(mask.reshape(8, 8)).long())
    text = text.last_hidden_state[:, 0].reshape(2, 4, -1)
    logits = ref.pred_model(text, tokens)
    text_emb = ref.txt_proj(text).mean(1)
  np.testing.assert_allclose(out["text_features"], text.numpy(), atol=1e-5)
  np.testing.assert_allclose(out["sort_logits"], logits.numpy(), atol=1e-4, rtol=1e-4)
  text_emb = text_emb.numpy() / np.linalg.norm(text_emb.numpy(), axis=-1, keepdims=True)
  np.testing.assert_allclose(out["text_emb"], text_emb, atol=1e-5)
