"""Text towers and tokenizers: DistilBERT's arithmetic and vocabulary, against transformers."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from configs import tiny
from data_pipelines import tokenizer as tok_lib
from tvts_jax import config_schema, convert, train
from tvts_jax.models import tvts as tvts_model

transformers = pytest.importorskip("transformers")

# A WordPiece vocabulary small enough to write here, with the special tokens DistilBERT's has.
_WORDS = ("the a he she cuts onion now um uh okay so and then we add salt pan hot oil "
          "two three 2 3 10 minutes stir it ##s ##ing ##ed on off").split()
_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _WORDS
# ASR-like transcripts: fillers, upper case, numbers, an empty string, one past text_len, and
# a word the vocabulary lacks.
_TEXTS = ["Um he cuts the onion", "", "OKAY so we add 2 minutes uh",
          "the pan the pan the pan the pan the pan the pan is hot", "then we stir it ZEBRA",
          "she stirs 10"]


def _fast_tokenizer(tmp_path, **kwargs):
  """transformers' DistilBertTokenizerFast over `_VOCAB` (v5 takes the vocabulary itself,
  v4 a vocab.txt)."""
  if int(transformers.__version__.split(".")[0]) >= 5:
    return transformers.DistilBertTokenizerFast(
        vocab={t: i for i, t in enumerate(_VOCAB)}, **kwargs)
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(_VOCAB) + "\n")
  return transformers.DistilBertTokenizerFast(vocab_file=str(vocab), **kwargs)


def _distilbert_config(**overrides):
  config = tiny.get_config()
  config.model.text.update(arch="distilbert", vocab_size=len(_VOCAB), width=32, depth=2,
                           num_heads=2, mlp_dim=64, max_positions=16, ln_eps=1e-12)
  config.update_from_flattened_dict(overrides)
  return config


def _hf_model(config, masked_lm=False):
  t = config.model.text
  hf_config = transformers.DistilBertConfig(
      vocab_size=t.vocab_size, dim=t.width, n_layers=t.depth, n_heads=t.num_heads,
      hidden_dim=t.mlp_dim, max_position_embeddings=t.max_positions)
  cls = transformers.DistilBertForMaskedLM if masked_lm else transformers.DistilBertModel
  torch.manual_seed(0)
  model = cls(hf_config).eval()
  with torch.no_grad():  # LayerNorms away from their init, so that a swapped one would show
    for name, p in model.named_parameters():
      if "LayerNorm" in name or "layer_norm" in name:
        p.add_(torch.randn_like(p) * 0.1)
  return model


def _save(model, directory, fmt):
  os.makedirs(directory, exist_ok=True)
  model.config.to_json_file(os.path.join(directory, "config.json"))
  if fmt == "safetensors":
    model.save_pretrained(directory)
  else:  # what older transformers wrote: a state dict pickle, read weights-only
    torch.save(model.state_dict(), os.path.join(directory, "pytorch_model.bin"))
  return directory


def _ours(config):
  model = tvts_model.build_model(config)
  graphdef, params = nnx.split(model)
  reports = []
  params = convert.load_init(config, params, reports)
  return nnx.merge(graphdef, params), reports


def _ids_and_mask(config, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, config.model.text.vocab_size, (3, 4, 8)).astype(np.int32)
  lengths = rng.integers(1, 9, (3, 4))
  mask = np.arange(8) < lengths[..., None]
  return np.where(mask, ids, 0).astype(np.int32), mask


@pytest.mark.parametrize("fmt,masked_lm", [("safetensors", False), ("bin", True)])
def test_distilbert_tower_equals_transformers(tmp_path, fmt, masked_lm):
  config = _distilbert_config()
  hf = _hf_model(config, masked_lm)
  path = _save(hf, str(tmp_path / "distilbert"), fmt)
  config.init_from = f"distilbert:{path}"
  model, reports = _ours(config)
  (source, report), = reports
  assert source == f"distilbert:{path}" and len(report.mapped) == 4 + 16 * 2
  # The masked-LM head is reported, not converted.
  assert sorted(report.skipped) == (
      ["vocab_layer_norm.", "vocab_projector.", "vocab_transform."] if masked_lm else [])
  assert "text/token_embed/embedding" not in report.kept_init
  assert "video/pos_embed" in report.kept_init

  ids, mask = _ids_and_mask(config)
  ours = np.asarray(model.encode_text(jnp.asarray(ids), jnp.asarray(mask)))
  body = hf.distilbert if masked_lm else hf
  with torch.no_grad():
    ref = body(input_ids=torch.from_numpy(ids.reshape(12, 8)).long(),
               attention_mask=torch.from_numpy(mask.reshape(12, 8)).long())
  ref = ref.last_hidden_state[:, 0].numpy().reshape(3, 4, -1)
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  # Padding really is masked: the features do not depend on what the padded ids are.
  other = np.where(mask, ids, 7).astype(np.int32)
  np.testing.assert_allclose(model.encode_text(jnp.asarray(other), jnp.asarray(mask)), ours,
                             atol=1e-6)


def test_hf_tokenizer_gives_distilbert_tokenizer_fast_ids(tmp_path):
  fast = _fast_tokenizer(tmp_path, do_lower_case=True)
  fast.save_pretrained(str(tmp_path / "tok"))
  ours = tok_lib.load(str(tmp_path / "tok"))  # the folder: its tokenizer.json
  assert isinstance(ours, tok_lib.HFTokenizer) and ours.vocab_size == len(_VOCAB)
  for length in (12, 6):
    ids, mask = ours.encode(_TEXTS, length)
    ref = fast(_TEXTS, padding="max_length", truncation=True, max_length=length)
    np.testing.assert_array_equal(ids, np.asarray(ref["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(ref["attention_mask"], bool))
    assert (ids[:, 0] == _VOCAB.index("[CLS]")).all()  # the read-out token
  # Truncation keeps the post-processor's [SEP]; the unknown word is [UNK].
  assert ours.encode(_TEXTS, 6)[0][3, 5] == _VOCAB.index("[SEP]")
  assert _VOCAB.index("[UNK]") in ours.encode(_TEXTS, 12)[0][4]


def test_tokenizer_errors_name_the_file_and_both_numbers(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer at .*missing/tokenizer.json"):
    tok_lib.load(str(tmp_path / "missing" / "tokenizer.json"))
  (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
  with pytest.raises(ValueError, match="bad.json: not a Hugging Face tokenizer.json"):
    tok_lib.load(str(tmp_path / "bad.json"))
  _fast_tokenizer(tmp_path).save_pretrained(str(tmp_path))
  path = str(tmp_path / "tokenizer.json")
  # At the start of a run, before any record is read.
  config = _distilbert_config()
  config.model.text.vocab_size = 64
  config.data.train_records = str(tmp_path / "no-records-*")
  config.data.tokenizer = path
  with pytest.raises(ValueError, match=rf"{path} has {len(_VOCAB)} tokens but "
                                       r"model.text.vocab_size=64"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_distilbert_checkpoint_of_another_shape_is_named(tmp_path):
  config = _distilbert_config()
  hf = _hf_model(_distilbert_config(**{"model.text.depth": 3}))
  path = _save(hf, str(tmp_path / "deep"), "safetensors")
  config.init_from = f"distilbert:{path}"
  with pytest.raises(convert.ConversionError,
                     match=r"config.json: the DistilBERT checkpoint has n_layers=3, this config "
                           r"builds model.text.depth=2"):
    _ours(config)
  # The weights file alone (no config.json): the depth is counted, the width read off a shape.
  config.init_from = f"distilbert:{path}/model.safetensors"
  with pytest.raises(convert.ConversionError, match="3 DistilBERT layers, this config builds "
                                                    "model.text.depth=2"):
    _ours(config)
  wide = _save(_hf_model(_distilbert_config(**{"model.text.width": 48})), str(tmp_path / "w"),
               "safetensors")
  config.init_from = f"distilbert:{wide}/model.safetensors"
  with pytest.raises(convert.ConversionError, match=r"shape \(16, 48\); this config needs at "
                                                    r"least 16 positions of width 32"):
    _ours(config)


class _Unsafe:
  """A pickled object: the weights-only loader must refuse it, never run it."""

  def __reduce__(self):
    return (os.system, ("touch /tmp/tvts-pwned",))


def test_a_pickled_object_in_a_bin_is_refused(tmp_path):
  directory = tmp_path / "evil"
  directory.mkdir()
  (directory / "config.json").write_text(json.dumps({"dim": 32}))
  torch.save({"embeddings.word_embeddings.weight": torch.zeros(3), "x": _Unsafe()},
             str(directory / "pytorch_model.bin"))
  config = _distilbert_config()
  config.init_from = f"distilbert:{directory}"
  with pytest.raises(convert.ConversionError, match="weights-only loader refused"):
    _ours(config)
  assert not os.path.exists("/tmp/tvts-pwned")


def test_text_longer_than_the_position_table_is_a_config_error():
  config = _distilbert_config(**{"data.text_len": 20})
  with pytest.raises(config_schema.ConfigError,
                     match="data.text_len=20 exceeds model.text.max_positions=16"):
    config_schema.validate(config)


def test_init_from_sources_apply_in_order_and_are_checked():
  assert config_schema.init_sources("mae:/a,b.pth, distilbert:/w/x") == [
      ("mae", "/a,b.pth"), ("distilbert", "/w/x")]
  config = _distilbert_config(**{"init_from": "mae:/a.pth,bert:/b"})
  with pytest.raises(config_schema.ConfigError, match="'bert:/b' is not one of"):
    config_schema.validate(config)
