"""Transcript tokenizers: one interface over sentencepiece and Hugging Face `tokenizer.json`.

    python -m data_pipelines.tokenizer --records='OUT/*-train.tfrecord-*' \
        --vocab_size=32000 --model=OUT/spm.model        # train a sentencepiece model

    tok = tokenizer.load(PATH)      # a sentencepiece `.model`, or a `tokenizer.json` (or the
    ids, mask = tok.encode(texts, max_len)   # folder holding one), by what the file is

`load` serves the input pipeline, the evaluations and exported models alike. Both kinds give
int32 ids [N, max_len] and a bool mask (True on real tokens, padding at the end), truncated to
`max_len`, and every row starts with the token the text tower reads its feature at:

- sentencepiece (`SentencePieceTokenizer`, trained on the transcripts with `train`): ids 0 =
  padding, 1 = unknown, 2 = BOS (the first token of every transcript: the `tvts` text tower's
  read-out), 3 = EOS (unused).
- Hugging Face (`HFTokenizer`, read with the `tokenizers` library): the file's own normaliser,
  pre-tokenizer, model and post-processor, so a pretrained tower gets the ids it was trained
  on; DistilBERT's gives `[CLS] ... [SEP]` (lower-cased WordPiece), its `[CLS]` first: the
  `distilbert` tower's read-out. Truncation keeps the post-processor's special tokens.

Importing this module does not import TensorFlow (only training from records, and reading a
`gs://` path, do): exported models load their tokenizer without it.
"""

from __future__ import annotations

import functools
import io
import os
from typing import Iterable, Sequence

import numpy as np

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SENTENCEPIECE_SUFFIX = ".model"
HF_FILE = "tokenizer.json"
# Padding tokens of common Hugging Face vocabularies, tried in order when the file sets none.
_HF_PAD_TOKENS = ("[PAD]", "<pad>", "<|endoftext|>")


def read_bytes(path: str) -> bytes:
  """A local or `gs://` file's bytes."""
  if "://" in path:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    with tf.io.gfile.GFile(path, "rb") as f:
      return f.read()
  with open(path, "rb") as f:
    return f.read()


def _exists(path: str) -> bool:
  if "://" in path:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf.io.gfile.exists(path)
  return os.path.exists(path)


class Tokenizer:
  """Encodes transcripts to fixed-length id arrays with a padding mask.

  Attributes:
    path: the file it was read from.
    vocab_size: ids are in [0, vocab_size).
  """
  path: str

  @property
  def vocab_size(self) -> int:
    raise NotImplementedError

  def encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [N, max_len], mask bool [N, max_len]): the read-out token first, truncated
    to max_len, padded at the end."""
    raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model (`train`): BOS, then the pieces, truncated, 0-padded."""

  def __init__(self, model_path: str):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self._sp = spm.SentencePieceProcessor(model_proto=read_bytes(model_path))
    self.path = model_path

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(texts), max_len), PAD_ID, np.int32)
    for i, pieces in enumerate(self._sp.encode(list(texts))):
      row = [BOS_ID] + pieces[:max_len - 1]
      ids[i, :len(row)] = row
    return ids, ids != PAD_ID

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids if i > EOS_ID])


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json`, with its own post-processor (special tokens)."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer as _Tokenizer  # pylint: disable=g-import-not-at-top
    try:
      self._tok = _Tokenizer.from_str(read_bytes(path).decode("utf-8"))
    except Exception as e:  # pylint: disable=broad-except  # the library's parse errors vary
      raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({e})") from e
    self.path = path
    padding = self._tok.padding
    pad = padding["pad_id"] if padding else None
    if pad is None:
      pad = next((i for t in _HF_PAD_TOKENS if (i := self._tok.token_to_id(t)) is not None), 0)
    self.pad_id = int(pad)
    self._max_len = None  # the library keeps one truncation/padding setting

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    if max_len != self._max_len:
      self._tok.enable_truncation(max_length=max_len)
      self._tok.enable_padding(length=max_len, pad_id=self.pad_id)
      self._max_len = max_len
    encodings = self._tok.encode_batch(list(texts))
    ids = np.asarray([e.ids for e in encodings], np.int32).reshape(len(texts), max_len)
    mask = np.asarray([e.attention_mask for e in encodings], bool).reshape(len(texts), max_len)
    return ids, mask


def load(path: str) -> Tokenizer:
  """The tokenizer of a file: a sentencepiece `.model`, or a `tokenizer.json`.

  Args:
    path: a `.model` file, a `tokenizer.json` file, or a directory holding `tokenizer.json`
      (a Hugging Face model folder).

  Raises:
    FileNotFoundError: no such file (or no tokenizer.json in the directory).
    ValueError: a file that is neither kind.
  """
  if not path:
    raise FileNotFoundError("no tokenizer path given (data.tokenizer)")
  if "://" not in path and os.path.isdir(path):
    path = os.path.join(path, HF_FILE)
  if not _exists(path):
    raise FileNotFoundError(f"no tokenizer at {path} (data.tokenizer: a sentencepiece .model "
                            f"or a Hugging Face {HF_FILE})")
  if path.endswith(SENTENCEPIECE_SUFFIX):
    return SentencePieceTokenizer(path)
  if path.endswith(".json"):
    return HFTokenizer(path)
  raise ValueError(f"{path}: a tokenizer is a sentencepiece {SENTENCEPIECE_SUFFIX} or a "
                   f"Hugging Face {HF_FILE}")


@functools.lru_cache(maxsize=None)
def load_cached(path: str) -> Tokenizer:
  """`load(path)`, once per process (the input pipeline calls it once per batch)."""
  return load(path)


def check_vocab(tok: Tokenizer, vocab_size: int, exact: bool) -> None:
  """Raises ValueError naming the file and both numbers when the vocabulary does not fit.

  Args:
    tok: the tokenizer.
    vocab_size: `model.text.vocab_size`.
    exact: the tower is a pretrained one whose embedding rows are this vocabulary's tokens,
      so the sizes must be equal (else at most `vocab_size`: a sentencepiece model trained
      with a soft limit may have fewer pieces).
  """
  n = tok.vocab_size
  if n > vocab_size or (exact and n != vocab_size):
    raise ValueError(f"the tokenizer {tok.path} has {n} tokens but model.text.vocab_size="
                     f"{vocab_size}" + (" (a pretrained text tower needs its own vocabulary, "
                                        "of the same size)" if exact else ""))


def iter_transcripts(records_pattern: str, max_records: int | None = None) -> Iterable[str]:
  """Yields each record's whole transcript (its words joined by spaces)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from data_pipelines import records  # pylint: disable=g-import-not-at-top
  files = sorted(tf.io.gfile.glob(records_pattern))
  if not files:
    raise FileNotFoundError(f"no record files match {records_pattern!r}")
  ds = tf.data.TFRecordDataset(files).map(lambda s: records.parse(s)["words"])
  if max_records:
    ds = ds.take(max_records)
  for words in ds.as_numpy_iterator():
    text = " ".join(w.decode() for w in words).strip()
    if text:
      yield text


def train(sentences: Iterable[str], vocab_size: int, model_path: str) -> str:
  """Trains a unigram sentencepiece model on `sentences` and writes it to `model_path`.

  `vocab_size` is an upper bound: on a small corpus (the demo world) the model gets as many
  pieces as the text supports.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  sentences = [s for s in sentences if s]
  if not sentences:
    raise ValueError("no non-empty transcripts to train a tokenizer on")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
      model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      input_sentence_size=2_000_000, shuffle_input_sentence=True,
      minloglevel=2)
  parent = os.path.dirname(model_path)
  if parent:
    tf.io.gfile.makedirs(parent)
  with tf.io.gfile.GFile(model_path, "wb") as f:
    f.write(model.getvalue())
  return model_path


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  path = train(iter_transcripts(f.records, f.max_records or None), f.vocab_size, f.model)
  print(f"wrote {path}: {load(path).vocab_size} pieces")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  flags.DEFINE_string("records", None, "glob of TFRecord shards", required=True)
  flags.DEFINE_integer("vocab_size", 32_000, "upper bound on the number of pieces")
  flags.DEFINE_string("model", None, "output .model path", required=True)
  flags.DEFINE_integer("max_records", 0, "read at most this many records (0: all)")
  app.run(main)
