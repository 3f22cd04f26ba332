"""`python -m tvts_jax.perf --input_only`: the arithmetic of cores per accelerator, variants."""
import os

import pytest

from configs import tiny
from data_pipelines import synthetic
from data_pipelines import tokenizer
from tvts_jax.perf import input as input_timing


def test_cores_needed():
  # The figures: one H200 on the paper step (1190 clips/s) at 108 clips/s per core.
  assert input_timing.cores_needed(108.0, 1190.0) == 12  # 11.02 cores: 11 are not enough
  assert input_timing.cores_needed(200.0, 1200.0) == 6  # exactly enough, not one more
  assert input_timing.cores_needed(200.0, 1190.0) == 6
  assert input_timing.cores_needed(2000.0, 1190.0) == 1
  with pytest.raises(ValueError, match="positive"):
    input_timing.cores_needed(0.0, 1190.0)
  r = input_timing.cores_report(100.0, 250.0, 1190.0, "given")
  assert r["cores_per_accelerator"] == 12 and r["cores_per_accelerator_cpu_s"] == 5
  assert r["accelerator_clips_per_s"] == 1190.0 and r["accelerator_rate"] == "given"
  assert input_timing.local_cores() == len(os.sched_getaffinity(0))


def test_parse_variant_and_config():
  assert input_timing.parse_variant("base") == {}
  assert input_timing.parse_variant("") == {}
  v = input_timing.parse_variant("data.shuffle_buffer=4, short_side=64,jpeg_quality=75")
  assert v == {"data.shuffle_buffer": 4, "short_side": 64, "jpeg_quality": 75}
  assert input_timing.describe(v) == "data.shuffle_buffer=4,short_side=64,jpeg_quality=75"
  c = input_timing.variant_config(tiny.get_config(), v)
  assert c.data.shuffle_buffer == 4  # the record keys are not config keys
  with pytest.raises(ValueError, match="KEY=VALUE"):
    input_timing.parse_variant("data.shuffle_buffer")
  with pytest.raises(KeyError, match="data.no_such_key"):
    input_timing.variant_config(tiny.get_config(), {"data.no_such_key": 1})


def test_compare_input_times_each_variant(tmp_path):
  out = str(tmp_path / "records")
  synthetic.generate(out, 8, num_shards=2, short_side=32, verbose=False)
  pattern = os.path.join(out, "*.tfrecord*")
  spm = tokenizer.train(tokenizer.iter_transcripts(pattern), 64, str(tmp_path / "spm.model"))
  seen = []

  def records_of(v):
    seen.append(v)
    return pattern, spm

  variants = [{}, {"data.shuffle_buffer": 2}]
  results = input_timing.compare_input(tiny.get_config(), variants, records_of, batches=1,
                                       rounds=2, drain=0, log=lambda _: None)
  assert [r["variant"] for r in results] == ["base", "data.shuffle_buffer=2"]
  assert seen == variants
  for r in results:
    assert len(r["per_round_clips_per_s"]) == 2 and r["clips_per_s"] > 0
    assert r["clips_per_s_per_core"] == pytest.approx(r["clips_per_s"] / r["cores"])
    assert r["batch_size"] == 8 and r["frames"] == 4


@pytest.mark.parametrize("short_side", [32, 64])  # decoded at the crop / at DCT scale 1/2
def test_decode_bound(tmp_path, short_side):
  out = str(tmp_path / "records")
  synthetic.generate(out, 1, num_shards=1, short_side=short_side, verbose=False)
  c = tiny.get_config()
  assert c.data.resize_short == 32
  r = input_timing.decode_bound(os.path.join(out, "*.tfrecord*"), c, repeats=3, num_clips=2)
  assert r["decode_ms_per_frame"] > 0
  assert r["decode_bound_clips_per_cpu_s"] == pytest.approx(
      1e3 / (r["decode_ms_per_frame"] * c.data.num_frames))
