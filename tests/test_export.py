"""Export: bit-exact round trips, checkpoint -> file -> features, clear errors, light loading."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import train_process
from configs import tiny
from tvts_jax import export
from tvts_jax.models import tvts as tvts_model


def _video(config, batch=3, seed=0):
  d = config.data
  return np.random.default_rng(seed).integers(
      0, 256, (batch, d.num_frames, d.image_size, d.image_size, 3), dtype=np.uint8)


def _cls(graphdef, params, video):
  return jax.jit(lambda p, v: nnx.merge(graphdef, p)(v)[:, 0])(params, video)


@pytest.fixture(scope="module")
def model_and_config():
  config = tiny.get_config()
  return tvts_model.build_model(config, seed=3), config


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_round_trip_is_bit_exact(model_and_config, tmp_path, suffix):
  model, config = model_and_config
  params = nnx.state(model)
  path = export.export_params(config, params, str(tmp_path / f"enc{suffix}"), step=42)
  meta, flat = export.read_export(path)
  assert meta["contents"] == "video_encoder" and meta["step"] == 42
  assert meta["config"]["model"]["video"]["width"] == 32
  expected = export.host_params(params, full=False)
  assert sorted(flat) == sorted(expected)
  assert "video/blocks/layers/1/attn/qkv/kernel" in flat  # path keys, list layout
  for k, v in expected.items():
    assert flat[k].dtype == v.dtype
    np.testing.assert_array_equal(flat[k], v)

  encoder = export.load_video_encoder(path)
  loaded = export.flatten_params(encoder.params.to_pure_dict(), "video/")
  for k, v in expected.items():
    np.testing.assert_array_equal(loaded[k], v)
  video = _video(config)
  vg, vp = nnx.split(model.video)
  features = encoder.embed(video)
  assert features.shape == (3, 32)
  np.testing.assert_array_equal(features, _cls(vg, vp, video))
  np.testing.assert_array_equal(encoder.tokens(video)[:, 0], features)

  sidecar = json.load(open(path + ".json"))
  assert sidecar["config"] == meta["config"]
  assert sidecar["params"]["video/pos_embed"] == [1, 17, 32]


def test_checkpoint_export_gives_the_checkpoints_features(tmp_path):
  # A scanned model's checkpoint (written from one device; restored onto the config's 4 x 2
  # data x fsdp mesh) exported in the list layout.
  config = tiny.get_config()
  config.model.scan_layers = True
  config.mesh.fsdp = 2
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  trainer = train_process.checkpoint_workdir(config, workdir, 5)

  path = export.export_checkpoint(config, workdir, str(tmp_path / "enc.safetensors"))
  encoder = export.load_video_encoder(path)
  assert encoder.metadata["step"] == 5
  assert not encoder.config.model.scan_layers
  video = _video(config)
  model = nnx.merge(trainer.graphdef, trainer.state["params"])
  vg, vp = nnx.split(model.video)
  # Scanned vs list blocks are different XLA programs: equal up to float reassociation.
  np.testing.assert_allclose(encoder.embed(video), _cls(vg, vp, video), atol=1e-5, rtol=1e-5)


def test_an_export_trained_with_cudnn_attention_loads_off_gpus(model_and_config, tmp_path):
  # The attention implementation belongs to the machine, not to the weights: a GPU run's
  # export (bfloat16, model.attention='cudnn') is read back with 'auto', XLA's attention on
  # this CPU, and gives the same features as the model it came from.
  model, config = model_and_config
  gpu_config = config.copy_and_resolve_references()
  gpu_config.update_from_flattened_dict({"compute_dtype": "bfloat16",
                                         "model.attention": "cudnn"})
  path = export.export_params(gpu_config, nnx.state(model), str(tmp_path / "gpu.npz"))
  assert export.read_export(path)[0]["config"]["model"]["attention"] == "cudnn"
  encoder = export.load_video_encoder(path, compute_dtype="float32")
  assert encoder.config.model.attention == "auto"
  video = _video(config)
  vg, vp = nnx.split(model.video)
  np.testing.assert_array_equal(encoder.embed(video), _cls(vg, vp, video))
  loaded, _ = export.load_model(export.export_params(
      gpu_config, nnx.state(model), str(tmp_path / "full.npz"), full=True))
  assert loaded.video_features(video).shape == (3, 32)


def test_full_export_loads_the_whole_model(model_and_config, tmp_path):
  model, config = model_and_config
  path = export.export_params(config, nnx.state(model), str(tmp_path / "full.npz"), full=True)
  loaded, loaded_config = export.load_model(path)
  assert loaded_config.data.num_clips == config.data.num_clips
  ours = export.flatten_params(nnx.state(model).to_pure_dict())
  theirs = export.flatten_params(nnx.state(loaded).to_pure_dict())
  assert sorted(ours) == sorted(theirs) and "sorter/head/kernel" in ours
  for k, v in ours.items():  # same module class + bit-identical parameters
    np.testing.assert_array_equal(theirs[k], v)

  encoder_only = export.export_params(config, nnx.state(model), str(tmp_path / "enc.npz"))
  with pytest.raises(export.ExportError, match="video encoder only"):
    export.load_model(encoder_only)


def test_full_export_carries_its_tokenizer_and_embeds_text(model_and_config, tmp_path):
  from data_pipelines import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  model, config = model_and_config
  sentences = [f"the {c} {s} moves left" for c in ("red", "blue", "green")
               for s in ("circle", "square")] * 4
  spm = tok_lib.train(sentences, 48, str(tmp_path / "run" / "spm.model"))
  path = str(tmp_path / "out" / "tvts.npz")
  export.export_params(config, nnx.state(model), path, full=True, tokenizer_path=spm)
  assert os.path.exists(path + ".tokenizer.model")
  assert export.read_export(path)[0]["tokenizer"] == "tvts.npz.tokenizer.model"
  loaded = export.load_model(path)
  texts = ["the red circle moves left", "um the blue square"]
  ids, mask = tok_lib.load(spm).encode(texts, config.data.text_len)
  features = model.encode_text(ids[:, None], mask[:, None])
  np.testing.assert_allclose(loaded.text_features(texts), features[:, 0], atol=1e-6)
  np.testing.assert_allclose(loaded.embed_text(texts), model.text_embedding(features),
                             atol=1e-6)
  video = _video(config)
  emb = loaded.embed_video(video)
  np.testing.assert_allclose(emb, model.video_embedding(model.video_features(video)), atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
  # A copy without its tokenizer says what is missing.
  os.remove(path + ".tokenizer.model")
  with pytest.raises(export.ExportError, match="tokenizer .*tvts.npz.tokenizer.model is missing"):
    export.load_model(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_truncated_file_is_a_clear_error(model_and_config, tmp_path, suffix):
  model, config = model_and_config
  path = export.export_params(config, nnx.state(model), str(tmp_path / f"enc{suffix}"))
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(export.ExportError, match="truncated"):
    export.load_video_encoder(path)


def test_mismatched_parameters_are_named(model_and_config, tmp_path):
  model, config = model_and_config
  flat = export.host_params(nnx.state(model), full=False)
  flat["video/pos_embed"] = flat["video/pos_embed"][:, :5]
  meta = {"contents": "video_encoder", "step": None,
          "config": json.loads(config.to_json_best_effort())}
  path = export.write_export(str(tmp_path / "bad.safetensors"), flat, meta)
  with pytest.raises(export.ExportError, match=r"video/pos_embed has shape \(1, 5, 32\)"):
    export.load_video_encoder(path)
  del flat["video/norm/scale"]
  path = export.write_export(str(tmp_path / "bad2.safetensors"), flat, meta)
  with pytest.raises(export.ExportError, match="missing.*video/norm/scale"):
    export.load_video_encoder(path)
  with pytest.raises(export.ExportError, match="extension"):
    export.export_params(config, nnx.state(model), str(tmp_path / "enc.pkl"))


def test_loading_needs_neither_tensorflow_nor_orbax_nor_the_trainer(model_and_config, tmp_path):
  model, config = model_and_config
  path = export.export_params(config, nnx.state(model), str(tmp_path / "enc.safetensors"))
  code = (
      "import sys, numpy as np, tvts_jax\n"
      f"enc = tvts_jax.load_video_encoder({path!r})\n"
      "print(enc.embed(np.zeros((2,) + enc.input_shape, np.uint8)).shape)\n"
      "bad = [m for m in ('tensorflow', 'orbax.checkpoint', 'tvts_jax.train', 'torch')\n"
      "       if m in sys.modules]\n"
      "print('heavy:', bad)\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                       text=True, env=env, timeout=300).stdout
  assert "(2, 32)" in out and "heavy: []" in out, out
