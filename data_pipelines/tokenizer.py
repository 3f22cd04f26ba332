"""Sentencepiece tokenizer for transcripts: train it from a record set, load it, encode.

    python -m data_pipelines.tokenizer --records='OUT/*-train.tfrecord-*' \
        --vocab_size=32000 --model=OUT/spm.model

Ids: 0 = padding, 1 = unknown, 2 = BOS (the first token of every transcript; the text tower's
feature is read there, like DistilBERT's [CLS]), 3 = EOS.
"""

from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm
import tensorflow as tf

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def iter_transcripts(records_pattern: str, max_records: int | None = None) -> Iterable[str]:
  """Yields each record's whole transcript (its words joined by spaces)."""
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


class Tokenizer:
  """Encodes transcripts to fixed-length id arrays with a padding mask."""

  def __init__(self, model_path: str):
    with tf.io.gfile.GFile(model_path, "rb") as f:
      self._sp = spm.SentencePieceProcessor(model_proto=f.read())
    self.model_path = model_path

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (ids int32 [N, max_len], mask bool [N, max_len]); BOS first, then truncated."""
    ids = np.full((len(texts), max_len), PAD_ID, np.int32)
    for i, pieces in enumerate(self._sp.encode(list(texts))):
      row = [BOS_ID] + pieces[:max_len - 1]
      ids[i, :len(row)] = row
    return ids, ids != PAD_ID

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids if i > EOS_ID])


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  path = train(iter_transcripts(f.records, f.max_records or None), f.vocab_size, f.model)
  tok = Tokenizer(path)
  print(f"wrote {path}: {tok.vocab_size} pieces")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  flags.DEFINE_string("records", None, "glob of TFRecord shards", required=True)
  flags.DEFINE_integer("vocab_size", 32_000, "upper bound on the number of pieces")
  flags.DEFINE_string("model", None, "output .model path", required=True)
  flags.DEFINE_integer("max_records", 0, "read at most this many records (0: all)")
  app.run(main)
