"""The TVTS model: shapes, token keeping, equivariance, gradients, layouts, remat, bf16.

Compilation dominates on CPU, so the model's parameters are created once (one jitted init)
and every variant (scan layout, bf16) reuses their values through its own graphdef; the
remat policies are compared on a BlockStack, the one place they act.
"""
import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from tvts_jax import config_schema, losses
from tvts_jax.models import layers, platform, tvts, video_vit
from tvts_jax.perf import aot

B = 3
# These tests are bound by XLA:CPU compile time; skipping LLVM's optimisations halves it
# without changing what is computed.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
TEMPERATURE = tiny.get_config().temperature


def _config(**overrides):
  c = tiny.get_config()
  c.update_from_flattened_dict(overrides)
  return c


def _graphdef(config):
  return nnx.split(nnx.eval_shape(lambda: tvts.build_model(config, 0)))[0]


@pytest.fixture(scope="module")
def base():
  """(config, graphdef, params) of the tiny fp32 list-layout model."""
  config = _config()
  params = jit(lambda: nnx.split(tvts.build_model(config, 0))[1])()
  # Non-zero temporal and type embeddings so that tests can see them (both are zero-init).
  pure = params.to_pure_dict()
  rng = np.random.RandomState(0)
  for path in (("video", "temporal_embed"), ("sorter", "type_embed")):
    leaf = pure[path[0]][path[1]]
    pure[path[0]][path[1]] = jnp.asarray(rng.randn(*leaf.shape) * 0.1, jnp.float32)
  params.replace_by_pure_dict(pure)
  return config, _graphdef(config), params


def _params_for(config, params):
  """The same parameter values, in the layout `config` builds."""
  abstract = nnx.state(nnx.eval_shape(lambda: tvts.build_model(config, 0)))
  pure = params.to_pure_dict()
  pure = (layers.to_scanned_layout(pure) if config.model.scan_layers
          else layers.to_list_layout(pure))
  abstract.replace_by_pure_dict(pure)
  return abstract


@pytest.fixture(scope="module")
def batch():
  c = tiny.get_config()
  d = c.data
  rng = np.random.RandomState(1)
  video = rng.randint(0, 256, (B, d.num_frames, d.image_size, d.image_size, 3), np.uint8)
  ids = rng.randint(1, c.model.text.vocab_size, (B, d.num_clips, d.text_len)).astype(np.int32)
  lengths = rng.randint(2, d.text_len + 1, (B, d.num_clips))
  mask = np.arange(d.text_len) < lengths[..., None]
  order = np.stack([rng.permutation(d.num_clips) for _ in range(B)]).astype(np.int32)
  return dict(video=jnp.asarray(video), text_ids=jnp.asarray(ids), text_mask=jnp.asarray(mask),
              order=jnp.asarray(order), valid=jnp.ones(B, bool))


@functools.partial(jit, static_argnums=0)
def _loss_and_grads(graphdef, params, batch, keep_rng, weights):
  """weights . (contrastive, sort) loss, its gradients and the model outputs."""

  def loss_fn(p):
    out = nnx.merge(graphdef, p)(batch["video"], batch["text_ids"], batch["text_mask"],
                                 keep_rng=keep_rng)
    contrastive, _ = losses.contrastive_loss(out["video_emb"], out["text_emb"],
                                             batch["valid"], TEMPERATURE)
    sort = losses.softmax_positions_loss(out["sort_logits"], batch["order"], batch["valid"])
    return weights[0] * contrastive + weights[1] * sort, out

  (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, out, grads


def _run(config, params, batch, weights=(1.0, 2.0), keep_rng=jax.random.key(7)):
  """Runs `_loss_and_grads` for the model `config` builds, with `params`' values."""
  return _loss_and_grads(_graphdef(config), _params_for(config, params), batch, keep_rng,
                         jnp.asarray(weights))


@pytest.fixture(scope="module")
def reference_run(base, batch):
  config, _, params = base
  return _run(config, params, batch)


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_trees_close(a, b, rtol, atol):
  a, b = _leaves(a), _leaves(b)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


# --- shapes and parameter names -----------------------------------------------------------


def test_output_shapes(base, batch, reference_run):
  config, _, _ = base
  _, out, _ = reference_run
  d, e = config.model.video.width, config.model.embed_dim
  k, kept = config.data.num_clips, config_schema.num_kept_per_slice(config)
  tubes = config.data.num_frames // config.model.video.tubelet
  expected = dict(video_tokens=(B, 1 + tubes * kept, d), video_cls=(B, d), video_emb=(B, e),
                  text_features=(B, k, config.model.text.width), text_emb=(B, e),
                  sort_logits=(B, k, k))
  assert {name: x.shape for name, x in out.items()} == expected
  assert all(x.dtype == jnp.float32 for x in out.values())
  np.testing.assert_allclose(np.linalg.norm(out["video_emb"], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out["text_emb"], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(out["video_cls"], out["video_tokens"][:, 0])


def test_evaluation_features_keep_every_token(base, batch):
  config, graphdef, params = base

  @jit
  def features(p, video):
    model = nnx.merge(graphdef, p)
    return model.encode_video(video), model.video_features(video)

  tokens, cls = features(params, batch["video"])
  n = config_schema.num_tokens_per_slice(config)
  assert tokens.shape == (B, 1 + 2 * n, config.model.video.width) and n == 16
  np.testing.assert_array_equal(cls, tokens[:, 0])


def test_parameter_names_and_shapes(base):
  # Converters (MAE, reference TVTS) and the exporter are keyed on these paths.
  flat = {"/".join(str(k.key) for k in path): np.shape(x)
          for path, x in jax.tree_util.tree_leaves_with_path(base[2].to_pure_dict())}
  expected = {
      "video/patch_embed/kernel": (2, 8, 8, 3, 32),
      "video/patch_embed/bias": (32,),
      "video/cls_token": (1, 1, 32),
      "video/pos_embed": (1, 17, 32),
      "video/temporal_embed": (1, 2, 32),
      "video/blocks/layers/1/attn/qkv/kernel": (32, 96),
      "video/blocks/layers/1/attn/proj/bias": (32,),
      "video/blocks/layers/1/mlp/fc1/kernel": (32, 64),
      "video/blocks/layers/1/norm2/scale": (32,),
      "video/norm/scale": (32,),
      "text/token_embed/embedding": (64, 32),
      "text/pos_embed": (1, 8, 32),
      "text/blocks/layers/0/mlp/fc2/kernel": (64, 32),
      "text/norm/bias": (32,),
      "sorter/type_embed": (2, 32),
      "sorter/blocks/layers/0/norm1/bias": (32,),
      "sorter/norm/scale": (32,),
      "sorter/head/kernel": (32, 4),
      "video_proj/kernel": (32, 16),
      "text_proj/kernel": (32, 16),
  }
  assert {k: flat.get(k) for k in expected} == expected
  # tiny has equal tower widths, so no sorter text projection. 2 + 1 + 1 blocks of 12 leaves,
  # then video 7, text 4, sorter 5 and the two projections' 2 + 2 leaves.
  assert not any(k.startswith("sorter/text_proj") for k in flat)
  assert len(flat) == 4 * 12 + 7 + 4 + 5 + 2 + 2


def test_constructor_and_inputs_are_validated(base, batch):
  bad = _config(**{"model.video.num_heads": 3})
  with pytest.raises(config_schema.ConfigError, match="num_heads"):
    nnx.eval_shape(lambda: tvts.TVTS(bad, rngs=nnx.Rngs(0)))
  config, graphdef, params = base
  model = nnx.merge(graphdef, params)
  with pytest.raises(ValueError, match="num_frames"):
    model(batch["video"][:, :2], batch["text_ids"], batch["text_mask"])
  with pytest.raises(ValueError, match="num_clips"):
    model(batch["video"], batch["text_ids"][:, :3], batch["text_mask"][:, :3])


def test_cudnn_attention_is_refused_off_nvidia_gpus():
  config = _config(**{"model.attention": "cudnn", "compute_dtype": "bfloat16"})
  with pytest.raises(config_schema.ConfigError, match="needs an NVIDIA GPU.*'cpu'"):
    nnx.eval_shape(lambda: tvts.build_model(config, 0))


def _recording_attention(calls):
  """jax.nn.dot_product_attention that records each call and computes it with XLA."""
  xla_attention = jax.nn.dot_product_attention

  def attention(q, k, v, *args, implementation=None, **kwargs):
    calls.append(dict(kwargs, implementation=implementation, dtype=q.dtype, shape=q.shape,
                      key_shape=k.shape))
    return xla_attention(q, k, v, *args, implementation="xla", **kwargs)

  return attention


@pytest.mark.parametrize("on_gpu,overrides,expected", [
    (False, {"compute_dtype": "bfloat16"}, "xla"),
    (True, {"compute_dtype": "bfloat16"}, "cudnn"),
    (True, {}, "xla"),  # float32: cuDNN's kernel is bfloat16 only
    (True, {"compute_dtype": "bfloat16", "model.text.num_heads": 8}, "xla"),  # head dim 4
    (True, {"compute_dtype": "bfloat16", "model.attention": "xla"}, "xla"),
    (True, {"compute_dtype": "bfloat16", "model.attention": "cudnn"}, "cudnn"),
])
def test_auto_attention_is_cudnn_only_where_cudnn_can_run(monkeypatch, on_gpu, overrides,
                                                          expected):
  monkeypatch.setattr(platform, "on_cuda_gpu", lambda: on_gpu)
  config = _config(**overrides)
  assert platform.resolve_attention(config) == expected
  assert tiny.get_config().model.attention == "auto"  # the default


@pytest.mark.parametrize("attention", ["cudnn", "auto"])
def test_attention_implementation_reaches_every_attention_layer(monkeypatch, batch, attention):
  # What a GPU run with model.attention='cudnn' (or the default 'auto') traces, minus the
  # kernel: every attention call of the three towers (scanned or not) must ask for cuDNN with
  # bfloat16 operands, and the text tower's key padding must arrive as lengths (cuDNN's form).
  calls = []
  monkeypatch.setattr(platform, "on_cuda_gpu", lambda: True)
  monkeypatch.setattr(platform, "on_cpu", lambda: False)  # a GPU's bfloat16 program
  monkeypatch.setattr(jax.nn, "dot_product_attention", _recording_attention(calls))
  for scan_layers in (False, True):
    config = _config(**{"model.attention": attention, "compute_dtype": "bfloat16",
                        "model.scan_layers": scan_layers})
    calls.clear()
    jax.eval_shape(lambda c=config: tvts.build_model(c, 0)(
        batch["video"], batch["text_ids"], batch["text_mask"], keep_rng=jax.random.key(0)))
    m = config.model
    # A scanned stack traces its body once, and the last block on its own when it is read
    # out at a few positions (text tower, sorter).
    expected = (m.video.depth + m.text.depth + m.sorter.depth if not scan_layers
                else 1 + min(m.text.depth, 2) + min(m.sorter.depth, 2))
    assert len(calls) == expected, calls
    assert all(c["implementation"] == "cudnn" and c["dtype"] == jnp.bfloat16 for c in calls)
    # No boolean mask, and only even query lengths (cuDNN's limit under differentiation).
    assert all("mask" not in c and c["shape"][1] % 2 == 0 and c["key_shape"][1] % 2 == 0
               for c in calls)
    b, k, _ = batch["text_ids"].shape
    text_calls = [c for c in calls if c["shape"][0] == b * k]
    assert text_calls and all(c["key_value_seq_lengths"].shape == (b * k,) for c in text_calls)


def _cudnn_equals_xla(monkeypatch, xla, cudnn, x, mask, num_queries, grad_atol):
  """Asserts that the two modules' values and input gradients agree, computing the 'cudnn'
  one's attention with XLA; returns its recorded cuDNN calls, all of even lengths and with
  no boolean mask."""
  calls = []
  monkeypatch.setattr(jax.nn, "dot_product_attention", _recording_attention(calls))

  def loss(module, x):
    return jnp.sum(jnp.sin(module(x, mask, num_queries)))

  want, want_grad = jax.value_and_grad(loss, argnums=1)(xla, x)
  got, got_grad = jax.value_and_grad(loss, argnums=1)(cudnn, x)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=grad_atol)
  cudnn_calls = [c for c in calls if c["implementation"] == "cudnn"]
  assert cudnn_calls and all(c["shape"][1] % 2 == 0 and c["key_shape"][1] % 2 == 0
                             and "mask" not in c for c in cudnn_calls)
  return cudnn_calls


@pytest.mark.parametrize("num_queries", [None, 1, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_cudnn_attention_pads_to_even_lengths_and_equals_xla(monkeypatch, num_queries, masked):
  # The cuDNN path pads odd query / key lengths by one row and turns key padding into
  # lengths; computed by XLA it must give XLA's attention exactly (values and gradients),
  # with only even lengths reaching the kernel.
  xla = layers.Attention(32, 2, dtype=jnp.float32, rngs=nnx.Rngs(0))
  cudnn = layers.Attention(32, 2, dtype=jnp.float32, attention="cudnn", rngs=nnx.Rngs(0))
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(6, 9, 32), jnp.float32)  # 9 tokens: odd
  lengths = np.array([1, 2, 5, 8, 9, 3])
  mask = jnp.asarray(np.arange(9) < lengths[:, None]) if masked else None
  cudnn_calls = _cudnn_equals_xla(monkeypatch, xla, cudnn, x, mask, num_queries,
                                  grad_atol=1e-6)
  np.testing.assert_array_equal(cudnn_calls[-1]["key_value_seq_lengths"],
                                lengths if masked else [9] * 6)
  if masked:  # ...and the padding really matters: attending to every key differs.
    assert not np.allclose(xla(x, None, num_queries), xla(x, mask, num_queries), atol=1e-3)


def _count_primitive(jaxpr, name: str) -> int:
  """Equations of a primitive in a jaxpr, sub-jaxprs (scan bodies, custom VJPs) included."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == name
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      count += _count_primitive(sub, name)
  return count


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("num_queries,masked", [(None, False), (None, True), (1, True)])
def test_cudnn_block_stack_pads_once_and_equals_xla(monkeypatch, scan_layers, num_queries,
                                                    masked):
  # An odd-length stack on the cuDNN path is padded once by a masked zero token, not in every
  # block: values and gradients equal XLA's attention on the odd sequence, every kernel call
  # sees even lengths, and the traced stack pads twice (tokens and mask) for any depth, plus
  # the read-out's one-query pad, where it used to pad q, k and v in every block.
  make = lambda attention: layers.BlockStack(3, 32, 2, 64, ln_eps=1e-6, dtype=jnp.float32,
                                             scan_layers=scan_layers, attention=attention,
                                             rngs=nnx.Rngs(0))
  xla, cudnn = make("xla"), make("cudnn")
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(4, 9, 32), jnp.float32)  # 9 tokens: odd
  lengths = np.array([1, 4, 9, 6])
  mask = jnp.asarray(np.arange(9) < lengths[:, None]) if masked else None
  # Three blocks of float32 sums in another order: up to ~4e-6 apart (jax 0.11).
  calls = _cudnn_equals_xla(monkeypatch, xla, cudnn, x, mask, num_queries, grad_atol=2e-5)
  assert all(c["key_shape"][1] == 10 for c in calls)
  assert cudnn(x, mask, num_queries).shape == (4, num_queries or 9, 32)
  jaxpr = jax.make_jaxpr(lambda x: cudnn(x, mask, num_queries))(x).jaxpr
  assert _count_primitive(jaxpr, "pad") == 2 + (num_queries is not None)


def test_cudnn_training_step_lowers_for_cuda(monkeypatch):
  # Runs only where jax's CUDA plugin is installed (no GPU needed): lowering for CUDA runs
  # jax's own cuDNN checks (head dims, even lengths under differentiation, masks) on the
  # model's real attention shapes, which the recording stand-in above cannot.
  if not aot.cuda_plugin_installed():
    pytest.skip("needs jax's CUDA plugin (jax-cuda12-plugin or jax-cuda13-plugin)")
  from tvts_jax import train  # pylint: disable=g-import-not-at-top
  from tvts_jax.perf import step  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(platform, "on_cuda_gpu", lambda: True)
  monkeypatch.setattr(platform, "on_cpu", lambda: False)
  config = _config(**{"model.attention": "cudnn", "compute_dtype": "bfloat16"})
  graphdef, params = tvts.abstract_model(config)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
           for k, v in step.synthetic_batch(config, B).items()}
  grad = jax.grad(lambda p, b: train.model_outputs_and_loss(graphdef, p, b, jax.random.key(0),
                                                            config)[0])
  text = jax.jit(grad).trace(params, batch).lower(lowering_platforms=("cuda",)).as_text()
  m = config.model
  layers_with_attention = m.video.depth + m.text.depth + m.sorter.depth
  assert text.count('@__cudnn$fmhaSoftmax(') == layers_with_attention
  assert text.count('@__cudnn$fmhaSoftmaxBackward(') == layers_with_attention


# --- video tower ---------------------------------------------------------------------------


@pytest.mark.parametrize("init,std", [("zeros", 0.02), ("normal", 0.02), ("normal", 1.0)])
def test_temporal_embedding_init(init, std):
  # The demo's from-scratch recipe relies on a unit-scale time signature; the reference's
  # zero init must stay exactly zero.
  config = _config(**{"model.video.temporal_init": init, "model.video.temporal_init_std": std,
                      "data.num_frames": 16})
  model = tvts.build_model(config, 0)
  temporal = np.asarray(model.video.temporal_embed[...])
  assert temporal.shape == (1, 8, 32)
  if init == "zeros":
    assert not temporal.any()
  else:
    assert abs(temporal.std() - std) < 0.15 * std and abs(temporal.mean()) < 0.2 * std



def test_tubelet_embed_is_a_strided_3d_conv():
  embed = video_vit.TubeletEmbed(2, 4, 5, dtype=jnp.float32, rngs=nnx.Rngs(0))
  embed.bias[...] = jnp.arange(5.0)
  # Frames on the 0..255 scale: the ImageNet normalisation is folded into the embedding.
  x = jnp.asarray(np.random.RandomState(2).randint(0, 256, (2, 4, 8, 12, 3)), jnp.float32)
  conv = jit(lambda x: jax.lax.conv_general_dilated(
      video_vit.normalize_video(x), embed.kernel[...], window_strides=(2, 4, 4),
      padding="VALID",
      dimension_numbers=("NTHWC", "THWIO", "NTHWC")) + embed.bias[...])(x)
  np.testing.assert_allclose(jit(embed)(x), conv.reshape(2, 2, 2 * 3, 5), rtol=1e-5,
                             atol=1e-5)


def test_kept_indices_are_random_per_sample_and_slice():
  idx = np.asarray(video_vit.sample_kept_indices(jax.random.key(0), 8, 4, 16, 4))
  assert idx.shape == (8, 4, 4) and idx.dtype == np.int32
  assert ((idx >= 0) & (idx < 16)).all()
  assert (np.diff(idx, axis=-1) > 0).all()  # distinct and ascending
  assert len({tuple(r) for r in idx.reshape(-1, 4)}) > 24  # of 32 (sample, slice) draws
  assert (idx[:, 0] != idx[:, 1]).any(axis=-1).all()  # slices of one sample differ
  other = np.asarray(video_vit.sample_kept_indices(jax.random.key(1), 8, 4, 16, 4))
  assert (idx != other).any()


def test_token_keeping_keeps_patches_with_their_position_embeddings(base, batch):
  config, graphdef, params = base
  vit = nnx.merge(graphdef, params).video
  embed = jit(lambda video, rng: vit.embed(video, rng))
  tubes, n, kept = vit.num_tubes, vit.num_patches, vit.num_kept
  assert kept == config_schema.num_kept_per_slice(config) == 4

  full = np.asarray(embed(batch["video"], None))
  assert full.shape == (B, 1 + tubes * n, vit.width)
  # The full sequence: tubelet features + spatial (slot 1 + n) + temporal (slice) embeddings.
  patches = np.asarray(vit.patch_embed(batch["video"]))
  pos, temporal = np.asarray(vit.pos_embed[...]), np.asarray(vit.temporal_embed[...])
  np.testing.assert_allclose(
      full[:, 1:].reshape(B, tubes, n, -1) - patches,
      np.broadcast_to(pos[:, None, 1:] + temporal[:, :, None], (B, tubes, n, vit.width)),
      rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(full[:, 0], np.broadcast_to(vit.cls_token[...][0] + pos[:, 0],
                                                         (B, vit.width)), rtol=1e-6)

  rng = jax.random.key(3)
  kept_tokens = np.asarray(embed(batch["video"], rng))
  assert kept_tokens.shape == (B, 1 + tubes * kept, vit.width)
  idx = np.asarray(video_vit.sample_kept_indices(rng, B, tubes, n, kept))
  gathered = np.take_along_axis(full[:, 1:].reshape(B, tubes, n, -1), idx[..., None], axis=2)
  # Kept patches are embedded after the gather (a matmul of other shape): equal to rounding.
  np.testing.assert_allclose(kept_tokens[:, 1:].reshape(B, tubes, kept, -1), gathered,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(kept_tokens[:, 0], full[:, 0])
  assert not np.array_equal(np.asarray(embed(batch["video"], jax.random.key(4))), kept_tokens)


# --- text tower and sorter -----------------------------------------------------------------


def test_text_tower_ignores_padding(base, batch):
  _, graphdef, params = base
  encode = jit(lambda p, ids, mask: nnx.merge(graphdef, p).encode_text(ids, mask))
  ids, mask = np.asarray(batch["text_ids"]), np.asarray(batch["text_mask"])
  feats = np.asarray(encode(params, ids, mask))
  assert feats.shape == (B, 4, 32)
  noisy = np.where(mask, ids, (ids + 7) % 64)  # change only the padded tokens
  np.testing.assert_allclose(encode(params, noisy, mask), feats, rtol=1e-5, atol=1e-6)
  changed = ids.copy()
  changed[:, :, 1] = (changed[:, :, 1] + 7) % 64  # a real token (every length >= 2)
  assert not np.allclose(encode(params, changed, mask), feats, atol=1e-4)
  # A fully padded transcript (e.g. a padding example) stays finite.
  assert np.isfinite(encode(params, ids, np.zeros_like(mask))).all()


def test_sorter_is_equivariant_to_transcript_order(base, batch, reference_run):
  _, graphdef, params = base
  _, out, _ = reference_run
  sort = jit(lambda p, v, t: nnx.merge(graphdef, p).sorter(v, t))
  logits = np.asarray(sort(params, out["video_tokens"], out["text_features"]))
  np.testing.assert_allclose(logits, out["sort_logits"], rtol=1e-5, atol=1e-5)
  perm = np.array([2, 0, 3, 1])
  permuted = sort(params, out["video_tokens"], out["text_features"][:, perm])
  np.testing.assert_allclose(permuted, logits[:, perm], rtol=1e-5, atol=1e-5)
  assert not np.allclose(logits, logits[:, perm], atol=1e-3)  # rows do differ


# --- gradients ---------------------------------------------------------------------------


def test_sort_loss_trains_video_and_sorter_but_not_text(base, batch):
  config, _, params = base
  _, _, grads = _run(config, params, batch, weights=(0.0, 1.0))
  grads = _leaves(grads.to_pure_dict())
  frozen = [k for k in grads if k.startswith(("['text']", "['text_proj']", "['video_proj']"))]
  trained = [k for k in grads if k.startswith(("['video']", "['sorter']"))]
  assert len(frozen) == 16 + 4 and len(trained) + len(frozen) == len(grads)
  for name in frozen:
    assert not grads[name].any(), name
  for name in trained:
    assert np.abs(grads[name]).max() > 0, name
  # The contrastive loss does train the text tower, and nothing in the sorter.
  _, _, grads = _run(config, params, batch, weights=(1.0, 0.0))
  grads = _leaves(grads.to_pure_dict())
  for name, g in grads.items():
    if name.startswith(("['text']", "['text_proj']", "['video']", "['video_proj']")):
      assert np.abs(g).max() > 0, name
    else:
      assert name.startswith("['sorter']") and not g.any(), name


def test_sort_trains_text_opens_the_text_tower_to_the_sort_loss(base, batch):
  config, _, params = base
  config = config_schema.validate(config.copy_and_resolve_references())
  config.sort_trains_text = True
  _, _, grads = _run(config, params, batch, weights=(0.0, 1.0))
  grads = _leaves(grads.to_pure_dict())
  text = [k for k in grads if k.startswith("['text']")]
  assert len(text) == 16
  for name in text:
    assert np.abs(grads[name]).max() > 0, name
  for name in grads:  # the contrastive projections still see no sort gradient
    if name.startswith(("['text_proj']", "['video_proj']")):
      assert not grads[name].any(), name


def test_scan_layers_model_matches_list_layout(base, batch, reference_run):
  # The same values in the other layout give the same outputs in all three towers. Gradients
  # through the scan are compared on a BlockStack below (where the scan lives): a whole-model
  # scanned backward pass costs ~10 s of XLA:CPU compile.
  config, _, params = base
  _, out, _ = reference_run
  scan_config = _config(**{"model.scan_layers": True})
  graphdef = _graphdef(scan_config)
  forward = jit(lambda p, b: nnx.merge(graphdef, p)(
      b["video"], b["text_ids"], b["text_mask"], keep_rng=jax.random.key(7)))
  scan_params = _params_for(scan_config, params)
  assert scan_params["video"]["blocks"]["layers"]["attn"]["qkv"]["kernel"].shape == (2, 32, 96)
  _assert_trees_close(forward(scan_params, batch), out, rtol=1e-4, atol=1e-5)


def test_layout_conversion_round_trips(base):
  pure = base[2].to_pure_dict()
  scanned = layers.to_scanned_layout(pure)
  assert scanned["video"]["blocks"]["layers"]["attn"]["qkv"]["kernel"].shape == (2, 32, 96)
  np.testing.assert_array_equal(scanned["video"]["blocks"]["layers"]["mlp"]["fc1"]["bias"][1],
                                pure["video"]["blocks"]["layers"][1]["mlp"]["fc1"]["bias"])
  _assert_trees_close(layers.to_list_layout(scanned), pure, rtol=0, atol=0)
  _assert_trees_close(layers.to_scanned_layout(scanned), scanned, rtol=0, atol=0)


# Remat lives in BlockStack only, so its variants are checked on a stack (cheap to compile)
# rather than on the whole model.
_STACK = dict(depth=2, width=32, num_heads=2, mlp_dim=64, ln_eps=1e-6)


def _stack(scan_layers, remat, dtype=jnp.float32, seed=0):
  return layers.BlockStack(**_STACK, dtype=dtype, scan_layers=scan_layers, remat=remat,
                           rngs=nnx.Rngs(seed))


@functools.partial(jit, static_argnums=(0, 1))
def _stack_loss_and_grads(scan_layers, remat, pure_params, x, mask, probe):
  stack = nnx.eval_shape(lambda: _stack(scan_layers, remat))
  graphdef, state = nnx.split(stack)
  state.replace_by_pure_dict(layers.to_scanned_layout(pure_params) if scan_layers
                             else pure_params)

  def loss_fn(s):
    return jnp.sum(nnx.merge(graphdef, s)(x, mask).astype(jnp.float32) * probe)

  loss, grads = jax.value_and_grad(loss_fn)(state)
  return loss, layers.to_list_layout(grads.to_pure_dict())


@pytest.fixture(scope="module")
def stack_inputs():
  rng = np.random.RandomState(5)
  params = jit(lambda: nnx.state(_stack(False, "none")).to_pure_dict())()
  x = jnp.asarray(rng.randn(2, 6, 32), jnp.float32)
  mask = jnp.asarray(np.arange(6) < np.array([[6], [3]]))  # second row: 3 padded keys
  probe = jnp.asarray(rng.randn(2, 6, 32), jnp.float32)
  return params, x, mask, probe


@pytest.fixture(scope="module")
def stack_reference(stack_inputs):
  return _stack_loss_and_grads(False, "none", *stack_inputs)


@pytest.mark.parametrize("scan_layers,remat", [
    (True, "none"), (False, "full"), (True, "dots"), (True, "dots_no_batch")])
def test_block_stack_scan_and_remat_match_plain_list(stack_inputs, stack_reference,
                                                     scan_layers, remat):
  loss, grads = _stack_loss_and_grads(scan_layers, remat, *stack_inputs)
  np.testing.assert_allclose(loss, stack_reference[0], rtol=1e-5)
  _assert_trees_close(grads, stack_reference[1], rtol=1e-4, atol=1e-5)
  # The policy is really applied: jax.checkpoint shows up in the program.
  jaxpr = str(jax.make_jaxpr(_stack_loss_and_grads.__wrapped__, static_argnums=(0, 1))(
      scan_layers, remat, *stack_inputs))
  assert ("remat" in jaxpr or "checkpoint" in jaxpr) == (remat != "none")
  assert ("scan" in jaxpr) == scan_layers


def test_bfloat16_compute_is_close_to_float32(base, batch, reference_run):
  config, _, params = base
  _, out, _ = reference_run
  bf_config = _config(compute_dtype="bfloat16")
  graphdef = _graphdef(bf_config)
  forward = jit(lambda p, b: nnx.merge(graphdef, p)(
      b["video"], b["text_ids"], b["text_mask"], keep_rng=jax.random.key(7)))
  bf_out = forward(_params_for(bf_config, params), batch)
  assert all(x.dtype == jnp.float32 for x in bf_out.values())  # logits/embeddings in fp32
  for name in ("video_tokens", "video_emb", "text_emb", "sort_logits"):
    np.testing.assert_allclose(bf_out[name], out[name], atol=0.1, err_msg=name)
  assert not np.array_equal(bf_out["sort_logits"], out["sort_logits"])  # really ran in bf16


def test_bfloat16_block_stack_gradients_are_close(stack_inputs, stack_reference):
  params, x, mask, probe = stack_inputs

  @jit
  def bf16_grads(pure):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: _stack(False, "none", jnp.bfloat16)))
    state.replace_by_pure_dict(pure)
    loss_fn = lambda s: jnp.sum(nnx.merge(graphdef, s)(x, mask).astype(jnp.float32) * probe)
    return jax.value_and_grad(loss_fn)(state)

  loss, grads = bf16_grads(params)
  assert all(g.dtype == np.float32 for g in _leaves(grads).values())  # fp32 params
  ref_loss, ref_grads = stack_reference
  np.testing.assert_allclose(loss, ref_loss, rtol=0.05, atol=0.5)
  ref = _leaves(ref_grads)
  for name, g in _leaves(grads.to_pure_dict()).items():
    scale = np.abs(ref[name]).max()
    np.testing.assert_allclose(g, ref[name], atol=0.05 * scale + 1e-3, err_msg=name)
