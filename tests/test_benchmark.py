"""The benchmark's deterministic parts: FLOP count, MFU, HLO reading, batch search; and that
remat / scan_layers give the plain model's loss and gradients. No timing is asserted."""
import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from tvts_jax import sharding, train
from tvts_jax.models import layers, matmul, platform, tvts
from tvts_jax.perf import aot, hlo, step
from tvts_jax.perf import flops as perf_flops

# Compile time dominates these tests on CPU; LLVM's optimisations do not change the results.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def test_analytic_flops_match_a_hand_count_for_the_tiny_config():
  # tiny: B=8, K=4; video D=32, depth 2, M=64, 4 frames of 32^2, tubelet 2, patch 8, keep
  # 25% -> 2 slices of 16 patches, 4 kept each -> 1 + 2*4 = 9 tokens; text D=32, depth 1,
  # M=64, L=8; sorter depth 1, M=64, 9 + 4 = 13 tokens; embed_dim E=16.
  config = tiny.get_config()
  flops = perf_flops.analytic_flops(config, batch_size=8)
  patch_embed = 2 * (8 * 2 * 4) * (2 * 8 * 8 * 3) * 32  # 64 kept tubelets of 384 values
  video_block = (2 * (8 * 9) * 32 * 64  # k, v projections
                 + 2 * (8 * 9) * (32 * 32 + 32 * 32)  # q and output projections
                 + 2 * (8 * 9) * (2 * 32 * 64)  # fc1 + fc2
                 + 2 * 2 * 8 * 9 * 9 * 32)  # scores + values
  # The only text block is the last: keys/values of all 8 tokens, the rest for token 0.
  text = (2 * (32 * 8) * 32 * 64 + 2 * 32 * (2 * 32 * 32 + 2 * 32 * 64)
          + 2 * 2 * 32 * 1 * 8 * 32)
  # The only sorter block is the last: keys/values of all 13 tokens, the rest for the K=4.
  sorter = (2 * (8 * 13) * 32 * 64 + 2 * (8 * 4) * (2 * 32 * 32 + 2 * 32 * 64)
            + 2 * 2 * 8 * 4 * 13 * 32)
  heads = 2 * 8 * 32 * 16 + 2 * 32 * 32 * 16 + 2 * 8 * 8 * 16 + 2 * 32 * 32 * 4
  assert flops["patch_embed"] == patch_embed == 1_572_864
  assert flops["video_blocks"] == 2 * video_block == 2_525_184
  assert flops["text"] == text == 1_474_560
  assert flops["sorter"] == sorter == 872_448
  assert flops["heads"] == heads == 51_200
  assert flops["forward"] == 6_496_256
  assert flops["total"] == 3 * 6_496_256


def test_analytic_flops_scale_with_text_len_and_projection():
  config = tiny.get_config()
  short, full = (perf_flops.analytic_flops(config, 8, text_len=n) for n in (4, 8))
  assert short["text"] < full["text"]
  assert short["video_blocks"] == full["video_blocks"]
  # A text tower narrower than the video tower adds the sorter's input projection.
  config.model.text.width = 16
  config.model.text.num_heads = 2
  narrow = perf_flops.analytic_flops(config, 8)
  extra = narrow["heads"] - (2 * 8 * 32 * 16 + 2 * 32 * 16 * 16 + 2 * 8 * 8 * 16
                             + 2 * 32 * 32 * 4)
  assert extra == 2 * 32 * 16 * 32


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),
    ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12),
    ("cpu", None),
])
def test_peak_table(kind, peak):
  assert perf_flops.peak_flops_per_device(kind) == peak


def test_mfu_arithmetic():
  # 1 PFLOP per step in 2 s on 4 devices of 250 TFLOP/s: 500 of 1000 TFLOP/s.
  assert perf_flops.mfu(1e15, 2.0, 4, 250e12) == pytest.approx(0.5)
  assert perf_flops.mfu(989e12 * 0.6, 1.0, 1, 989e12) == pytest.approx(0.6)
  assert perf_flops.mfu(1e15, 2.0, 4, None) is None


_HLO = """HloModule jit_step, is_scheduled=true

%fused_computation (param_0: bf16[4,8]) -> bf16[8,4] {
  %param_0 = bf16[4,8]{1,0} parameter(0)
  ROOT %transpose.1 = bf16[8,4]{1,0} transpose(%param_0), dimensions={1,0}
}

ENTRY %main.9 (state.1: f32[16,16], x.2: bf16[4,8]) -> (f32[16,16], bf16[8,8]) {
  %state.1 = f32[16,16]{1,0} parameter(0)
  %x.2 = bf16[4,8]{1,0} parameter(1)
  %copy.3 = f32[16,16]{1,0} copy(%state.1)
  %fusion.4 = bf16[8,4]{1,0} fusion(%x.2), kind=kLoop, calls=%fused_computation
  %dot.5 = f32[8,8]{1,0} dot(%fusion.4, %x.2), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %exponential.6 = f32[8,8]{1,0} exponential(%dot.5)
  %custom-call.7 = bf16[8,8]{1,0} custom-call(%x.2), custom_call_target="__cudnn$fmhaSoftmax"
  %all-reduce.8 = f32[8,8]{1,0} all-reduce(%exponential.6), replica_groups={}, to_apply=%add
  ROOT %tuple.9 = (f32[16,16]{1,0}, bf16[8,8]{1,0}) tuple(%copy.3, %custom-call.7)
}
"""


def test_hlo_stats_reads_copies_dots_and_kernels():
  stats = hlo.hlo_stats(_HLO)
  assert stats["copies"] == 1 and stats["copy_bytes"] == 16 * 16 * 4
  assert stats["state_copies"] == 1 and stats["state_copy_bytes"] == 16 * 16 * 4
  assert stats["transposes"] == 0 and stats["transposes_in_fusions"] == 1
  assert stats["dots"] == {"bf16,bf16->f32": 1}
  assert stats["exponentials"] == {"f32": 1}
  assert stats["custom_calls"] == {"__cudnn$fmhaSoftmax": 1}
  assert stats["fused_attention"]
  assert stats["collectives"] == {"all-reduce": 1}


def test_hlo_stats_of_a_compiled_donated_update_has_no_state_copy():
  update = jax.jit(lambda s, g: jax.tree.map(lambda a, b: a - 0.1 * b, s, g),
                   donate_argnums=(0,))
  state = {"w": jnp.ones((64, 64)), "b": jnp.ones((64,))}
  compiled = update.lower(state, state).compile()
  stats = hlo.hlo_stats(compiled.as_text())
  assert stats["state_copies"] == 0
  mem = hlo.memory_analysis(compiled)
  assert mem["alias"] == (64 * 64 + 64) * 4


def test_find_max_batch_doubles_then_bisects(monkeypatch):
  # A fake memory model: 1 GiB of state + 100 MiB per example per device; 4 devices.
  per_example, fixed, limit = 100 * 2**20, 2**30, 8 * 2**30
  compiled_batches = []

  class _Mesh:
    size = 4

  class _Trainer:
    mesh = _Mesh()

  def fake_compile(trainer, config, batch, text_len):
    del trainer, config, text_len
    compiled_batches.append(batch)
    return batch, 0.0, 0.0, None

  monkeypatch.setattr(step, "compile_step", fake_compile)
  monkeypatch.setattr(hlo, "memory_analysis",
                      lambda batch: {"estimate": fixed + per_example * batch // 4})
  config = ml_collections.ConfigDict(dict(batch_size=24))
  out = step.find_max_batch(_Trainer(), config, limit_bytes=limit, fraction=0.9,
                            log=lambda _: None)
  # 0.9 * 8 GiB - 1 GiB = 6.2 GiB -> 63.5 examples per device -> 252 (a multiple of 4).
  best = max(b for b in range(4, 1000, 4) if fixed + per_example * b // 4 <= 0.9 * limit)
  assert out["max_batch"] == best == 252 and out["per_device"] == 63
  assert compiled_batches[:4] == [24, 48, 96, 192]  # doubling from the config's batch
  assert len(compiled_batches) == len(set(compiled_batches)) <= 12
  # Starting above the limit halves first.
  config.batch_size = 1024
  assert step.find_max_batch(_Trainer(), config, limit_bytes=limit, fraction=0.9,
                             log=lambda _: None)["max_batch"] == 252
  # A coarser search: only multiples of lcm(4 devices, 48) = 48, so 240, in fewer compiles.
  compiled_batches.clear()
  config.batch_size = 24
  kept = {}
  out = step.find_max_batch(_Trainer(), config, limit_bytes=limit, fraction=0.9,
                            multiple=48, compiled=kept, log=lambda _: None)
  assert out["max_batch"] == 240 and out["per_device"] == 60
  # The step compiled at the answer is handed back (timed without compiling it again).
  assert list(kept) == [240] and kept[240][0] == 240
  assert all(b % 48 == 0 for b in compiled_batches) and len(compiled_batches) <= 6


def _loss_and_grads(config, params_pure):
  """Loss and gradients (list layout) of the training loss at the given parameters."""
  graphdef, abstract = tvts.abstract_model(config)
  pure = (layers.to_scanned_layout(params_pure) if config.model.scan_layers
          else layers.to_list_layout(params_pure))
  abstract.replace_by_pure_dict(pure)
  params = abstract
  batch = {k: jnp.asarray(v) for k, v in
           step.synthetic_batch(config, config.batch_size).items()}
  rng = jax.random.key(3)

  @jit
  def run(p):
    f = lambda q: train.model_outputs_and_loss(graphdef, q, batch, rng, config)[0]
    return jax.value_and_grad(f)(p)

  loss, grads = run(params)
  return float(loss), layers.to_list_layout(grads.to_pure_dict())


def test_remat_and_scan_match_the_plain_model():
  config = tiny.get_config()
  config.batch_size = 4
  params = jit(lambda: nnx.split(tvts.build_model(config, 0))[1])().to_pure_dict()
  params = jax.tree.map(np.asarray, params)
  ref_loss, ref_grads = _loss_and_grads(config, params)
  for scan, remat in ((False, "full"), (True, "none"), (True, "dots")):
    c = config.copy_and_resolve_references()
    c.model.scan_layers, c.model.remat = scan, remat
    loss, grads = _loss_and_grads(c, params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=f"{scan=} {remat=}")
    flat_ref = jax.tree_util.tree_flatten_with_path(ref_grads)[0]
    flat = dict(jax.tree_util.tree_flatten_with_path(grads)[0])
    for path, g in flat_ref:
      np.testing.assert_allclose(flat[path], g, rtol=2e-4, atol=2e-5,
                                 err_msg=f"{scan=} {remat=} {jax.tree_util.keystr(path)}")


def _grad_temp_bytes(config, batch_size):
  """XLA's temporary memory for the loss gradient of `config` (compiled, nothing run)."""
  graphdef, params = tvts.abstract_model(config)
  batch = {k: jnp.asarray(v) for k, v in
           step.synthetic_batch(config, batch_size).items()}
  grad = jax.grad(lambda p: train.model_outputs_and_loss(graphdef, p, batch, jax.random.key(0),
                                                         config)[0])
  return jit(grad).lower(params).compile().memory_analysis().temp_size_in_bytes


def test_remat_with_scanned_layers_lowers_the_step_memory():
  # What remat is for: fewer activations alive in the backward pass. The scanned layout is
  # the one where XLA keeps the recomputation in the loop (on XLA:CPU the list layout's
  # recomputation is scheduled early and saves nothing; README, Benchmark).
  temps = {}
  for remat in ("none", "dots", "full"):
    config = tiny.get_config()
    config.model.scan_layers, config.model.remat = True, remat
    temps[remat] = _grad_temp_bytes(config, 64)
  assert temps["full"] < temps["dots"] < temps["none"], temps
  assert temps["full"] < 0.8 * temps["none"], temps


def test_benchmark_step_reports_every_key():
  config = tiny.get_config()
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=4, fsdp=2)))
  trainer = train.Trainer(config, mesh)
  report = step.benchmark_step(trainer, config, steps=2, warmup=1, text_len=6)
  for key in ("step_time_s", "clips_per_s", "flops_per_step", "flops_per_step_analytic",
              "tflops_per_s", "mfu", "peak_memory_bytes", "compile_time_s", "device",
              "batch_size"):
    assert key in report, key
  assert report["batch_size"] == 8 and report["text_len"] == 6
  assert report["device"] == "cpu x8" and report["mfu"] is None
  assert report["clips_per_s"] == pytest.approx(8 / report["step_time_s"])
  assert report["flops_per_step_analytic"] == perf_flops.analytic_flops(config, 8, 6)["total"]
  assert report["flops_per_step"] > 0 and np.isfinite(report["loss"])
  assert int(trainer.state["step"]) == 3
  # Donation works: the state's outputs reuse its buffers, and no part of the state is copied
  # (a scalar counter may be).
  assert report["memory"]["alias"] >= report["state_bytes_per_device"] > 0
  assert report["hlo"]["state_copy_bytes"] <= 64, report["hlo"]


def _bf16_step_stats():
  config = tiny.get_config()
  config.compute_dtype = "bfloat16"
  trainer = train.Trainer(config, sharding.make_mesh(config.mesh))
  lowered = trainer._train_step.lower(  # pylint: disable=protected-access
      trainer.abstract_state(), step._abstract_batch(trainer, config, 8, None))
  return hlo.lowered_stats(lowered.as_text())


def test_bf16_config_runs_matmuls_in_bf16_and_softmax_in_f32(monkeypatch):
  # The program a GPU / TPU gets (lowered here without compiling it): bf16 activations.
  monkeypatch.setattr(platform, "on_cpu", lambda: False)
  stats = _bf16_step_stats()
  bf16 = sum(n for k, n in stats["dots"].items() if k.startswith("bf16,bf16"))
  # Every block matmul (forward and backward) is bf16; f32 ones are the small heads and losses.
  assert bf16 > 2 * sum(n for k, n in stats["dots"].items() if not k.startswith("bf16,bf16"))
  # Softmaxes, logsumexps and the losses exponentiate in f32; bf16 exps are GELU's gradient.
  assert stats["exponentials"].get("f32", 0) >= 4


def test_bf16_on_cpu_multiplies_bf16_into_f32_and_keeps_activations_f32():
  stats = _bf16_step_stats()
  # XLA:CPU's native bf16 matmul returns f32; a bf16-returning one it would run as f32 x f32.
  assert not any(k.endswith("->bf16") for k in stats["dots"]), stats["dots"]
  # Each Linear's three matmuls (forward, input and weight gradient) take bf16 operands.
  assert stats["dots"].get("bf16,bf16->f32", 0) >= 3 * 4 * 3, stats["dots"]
  assert "bf16" not in stats["exponentials"], stats["exponentials"]


def _one_device_mesh(config):
  # One device holds the whole batch of 8: the matmuls have the shapes a CPU run has (split
  # over 8 fake devices, one example each, XLA lowers the weight gradients differently).
  return sharding.make_mesh(config.mesh, devices=jax.devices()[:1])


def test_cpu_bf16_matmuls_stay_bf16_when_compiled():
  # XLA:CPU converts a bf16 matmul it has no kernel for (one contracting the leading
  # dimension, as a plain weight gradient x^T g does) to f32 x f32: the compiled step must keep
  # every bf16 matmul of the lowered one (matmul._cpu_weight_grad), at twice the f32 rate.
  config = tiny.get_config()
  config.compute_dtype = "bfloat16"
  trainer = train.Trainer(config, _one_device_mesh(config))
  compiled, _, _, lowered = step.compile_step(trainer, config, 8, None)
  lowered_bf16 = hlo.lowered_stats(lowered.as_text())["dots"]["bf16,bf16->f32"]
  assert lowered_bf16 >= 3 * 4 * 3
  assert hlo.hlo_stats(compiled.as_text())["dots"].get("bf16,bf16->f32") == lowered_bf16


def test_cpu_weight_gradients_contract_a_row_major_copy():
  # XLA:CPU's fast matmul (YNNPACK) rejects one whose lhs contracts its leading dimension, the
  # plain weight-gradient form x^T g: f32 ones then ran in Eigen, bf16 ones were converted to
  # f32. Every Linear's weight gradient must come from `_cpu_weight_grad`'s row-major copy.
  config = tiny.get_config()
  trainer = train.Trainer(config, _one_device_mesh(config))
  compiled, _, _, _ = step.compile_step(trainer, config, 8, None)
  weight_grads = [
      m for m in re.finditer(r"= f32\[(\d+),(\d+)\]\{[\d,]+\} dot\([^\n]*"
                             r"lhs_contracting_dims=\{0\}", compiled.as_text())
      if min(int(m.group(1)), int(m.group(2))) >= 16]  # the model's [K, N] weights
  assert not weight_grads, [m.group(0)[:120] for m in weight_grads]


def test_cpu_weight_gradient_is_x_transposed_times_g():
  rng = np.random.RandomState(0)
  for k, n in ((16, 24), (24, 16)):  # x^T copied, or g^T copied and the product transposed
    x = jnp.asarray(rng.randn(40, k), jnp.bfloat16)
    g = jnp.asarray(rng.randn(40, n), jnp.bfloat16)
    got = jax.jit(matmul._cpu_weight_grad)(x, g)  # pylint: disable=protected-access
    assert got.shape == (k, n) and got.dtype == jnp.float32
    want = np.asarray(x, np.float32).T @ np.asarray(g, np.float32)  # the same bf16 inputs
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_cpu_bf16_dense_values_and_gradients():
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(3, 5, 16), jnp.float32)
  w = jnp.asarray(rng.randn(16, 8) / 4, jnp.float32)
  b = jnp.asarray(rng.randn(8), jnp.float32)
  g = jnp.asarray(rng.randn(3, 5, 8), jnp.float32)

  def loss(fn, x, w, b):
    return jnp.sum(fn(x, w, b) * g)

  ours = lambda x, w, b: matmul.dense(x, w, b, jnp.bfloat16)
  exact = lambda x, w, b: x @ w + b
  assert ours(x, w, b).dtype == jnp.float32  # the activation dtype on CPU
  np.testing.assert_allclose(ours(x, w, b), exact(x, w, b), rtol=2e-2, atol=3e-2)
  # The custom backward pass (bf16 operands, f32 results, f32 bias sum) against autodiff of
  # the same function computed in f32: equal up to bf16 rounding of x, w and the cotangent.
  got = jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2))(x, w, b)
  want = jax.grad(functools.partial(loss, exact), argnums=(0, 1, 2))(x, w, b)
  for name, a, e in zip("xwb", got, want):
    assert a.dtype == jnp.float32 and a.shape == e.shape, name
    np.testing.assert_allclose(a, e, rtol=3e-2, atol=5e-2, err_msg=name)
  np.testing.assert_allclose(got[2], want[2], rtol=1e-6, atol=1e-6)  # bias: exact f32 sum
  no_bias = jax.grad(lambda x, w: jnp.sum(matmul.dense(x, w, None, jnp.bfloat16) * g),
                     argnums=(0, 1))(x, w)
  for a, e in zip(no_bias, want[:2]):
    np.testing.assert_allclose(a, e, rtol=3e-2, atol=5e-2)
  # And the rounding is really bf16: the result is not the f32 product.
  assert np.abs(np.asarray(ours(x, w, b) - exact(x, w, b))).max() > 1e-4


def test_side_by_side_timing_alternates_blocks():
  # --compare_torch: our timed steps run in blocks, each after one untimed step, and the
  # other implementation runs a block of as many steps after each of ours.
  config = tiny.get_config()
  trainer = train.Trainer(config, sharding.make_mesh(config.mesh))
  blocks = []
  report = step.benchmark_step(trainer, config, steps=7, warmup=1, text_len=6,
                               other=blocks.append, block=3)
  assert blocks == [3, 3, 1]
  assert len(report["step_times_s"]) == 7
  assert int(trainer.state["step"]) == 1 + 7 + 3  # warm-up, timed, one untimed per block


def test_cpu_f32_dense_equals_autodiff():
  # In float32 the CPU custom backward pass only re-lays out the weight gradient.
  rng = np.random.RandomState(1)
  x, g = jnp.asarray(rng.randn(3, 5, 16), jnp.float32), jnp.asarray(rng.randn(3, 5, 24))
  w, b = jnp.asarray(rng.randn(16, 24) / 4, jnp.float32), jnp.asarray(rng.randn(24), jnp.float32)
  loss = lambda fn, x, w, b: jnp.sum(fn(x, w, b) * g)
  ours = functools.partial(loss, lambda x, w, b: matmul.dense(x, w, b, jnp.float32))
  exact = functools.partial(loss, lambda x, w, b: x @ w + b)
  np.testing.assert_allclose(ours(x, w, b), exact(x, w, b), rtol=1e-6)
  for a, e in zip(jax.grad(ours, argnums=(0, 1, 2))(x, w, b),
                  jax.grad(exact, argnums=(0, 1, 2))(x, w, b)):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)


def test_torch_reference_model_has_our_parameter_count_and_trains():
  # The side-by-side PyTorch model must be the same architecture as ours (same parameter
  # count, text width != video width so the sorter's text projection exists in both), and its
  # step must run; it runs in a subprocess, as `perf --compare_torch` does.
  pytest.importorskip("torch")
  from tvts_jax.perf import torch_ref  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.model.text.update(width=48, num_heads=2, mlp_dim=96)
  ours = sum(x.size for x in jax.tree.leaves(
      nnx.state(nnx.eval_shape(lambda: tvts.build_model(config)), nnx.Param)))
  report = torch_ref.run_in_subprocess(config, text_len=6, steps=2, warmup=1)
  side = torch_ref.SideBySide(config, text_len=6, warmup=1)  # as --compare_torch runs it
  assert len(side.run(2)) == 2 and len(side.run(1)) == 1
  assert len(side.close()["torch_step_times_s"]) == 3
  assert report["torch_params"] == ours
  assert report["torch_batch_size"] == 8 and report["torch_text_len"] == 6
  assert len(report["torch_step_times_s"]) == 2 and report["torch_step_time_s"] > 0
  assert np.isfinite(report["torch_loss"])
  # A subprocess that dies is an error carrying its traceback, not a hang.
  config.model.text.num_heads = 5  # 48 is not divisible by 5: the PyTorch model fails
  with pytest.raises(RuntimeError, match="reference benchmark failed(.|\n)*Traceback"):
    torch_ref.SideBySide(config, text_len=6, warmup=1)


# --- compiling for a GPU this machine does not have (tvts_jax/perf/aot.py) ----------------

_HAS_CUDA_PLUGIN = aot.cuda_plugin_installed()


def test_target_platform_override_decides_the_program():
  try:
    platform.set_target_platform("cuda")
    assert not platform.on_cpu() and platform.on_cuda_gpu()
    platform.set_target_platform("cpu")
    assert platform.on_cpu() and not platform.on_cuda_gpu()
  finally:
    platform.set_target_platform(None)
  assert platform.on_cpu() == (jax.default_backend() == "cpu")
  with pytest.raises(ValueError, match="'tpu'"):
    platform.set_target_platform("tpu")


def test_aot_targets_and_memory_limit(monkeypatch):
  assert "device_memory_size: 84929347584" in aot.target_config("h100")
  assert 'device_description_str: "NVIDIA H200"' in aot.target_config("h200")
  with pytest.raises(ValueError, match="unknown --aot_target 'a100'"):
    aot.target_config("a100")
  # JAX's allocator takes 75% of the card unless told otherwise: the limit a real run has.
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  assert aot.memory_limit("h100") == int(84_929_347_584 * 0.75)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  assert aot.memory_limit("h100") == int(84_929_347_584 * 0.9)


@pytest.mark.skipif(_HAS_CUDA_PLUGIN, reason="jax's CUDA plugin is installed")
def test_aot_without_the_cuda_plugin_says_what_to_install():
  with pytest.raises(RuntimeError, match="pip install jax-cuda12-plugin"):
    aot.AotTrainer(tiny.get_config(), "h100")
  assert platform.on_cpu() == (jax.default_backend() == "cpu")  # nothing was switched


@pytest.mark.skipif(not _HAS_CUDA_PLUGIN, reason="needs jax's CUDA plugin (no GPU needed)")
def test_aot_target_compiles_the_step_for_an_h100_without_one():
  # A subprocess: the deviceless CUDA setup must happen before JAX starts its backends.
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="")  # not the tests' 8 fake CPU devices
  out = subprocess.run(
      [sys.executable, "-m", "tvts_jax.perf", "--config=configs/tiny.py",
       "--config.compute_dtype=bfloat16",  # model.attention: the default 'auto'
       "--aot_target=h100", "--find_max_batch", "--max_batch=64"],
      capture_output=True, text=True, cwd=repo, env=env, timeout=900, check=True)
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["device"] == "NVIDIA H100 80GB HBM3 x1"
  assert report["max_batch"] == 64  # the tiny model fits the cap
  assert 0 < report["peak_memory_bytes"] < report["limit_bytes"]
  calls = report["hlo"]["custom_calls"]
  assert any("cublas" in k for k in calls), calls  # compiled for the GPU, not the host
  assert report["attention"] == "cudnn"  # 'auto' on an NVIDIA target in bfloat16
  assert report["hlo"]["fused_attention"], calls  # and cuDNN attention compiled with it
