r"""A PyTorch model of the reference TVTS architecture, timed at the same shapes as ours.

    python -m tvts_jax.perf.torch_ref --config=configs/paper.py --config.batch_size=2 \
        --text_len=32 --steps=8
    python -m tvts_jax.perf --config=configs/paper.py --config.batch_size=2 \
        --text_len=32 --compare_torch        # both, in alternating blocks, and their ratio

Published per-step figures for the reference come from some other machine; on a shared or
virtual machine only a side-by-side run gives a fair ratio. This module builds what the
reference trains (the architecture of the paper's published code), the way the reference runs
it: eager PyTorch, fp32, attention as explicit matmul + softmax, a DistilBERT-shaped post-LN
text encoder (random weights: speed only), token keeping by gather, and AdamW. It needs
`pip install -e '.[torch]'`; it is the only module of the package that imports torch.
The last line printed is JSON: `torch_step_time_s` (median), `torch_clips_per_s`,
`torch_step_times_s`, `torch_params`, `torch_version`, `torch_threads`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import ml_collections


def _build(config: ml_collections.ConfigDict, text_len: int):
  """Returns (model, make_batch) for the config's shapes (imports torch lazily)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  v, t, s, d = config.model.video, config.model.text, config.model.sorter, config.data
  k = d.num_clips
  grid = (d.image_size // v.patch_size) ** 2
  tubes = d.num_frames // v.tubelet
  kept = max(1, int(round(grid * v.keep_ratio)))

  class Attention(nn.Module):

    def __init__(self, dim, heads):
      super().__init__()
      self.heads = heads
      self.qkv = nn.Linear(dim, 3 * dim)
      self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias=None):
      b, n, c = x.shape
      q, kk, vv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(
          2, 0, 3, 1, 4)
      attn = (q * (c // self.heads) ** -0.5) @ kk.transpose(-2, -1)
      if bias is not None:
        attn = attn + bias
      x = (attn.softmax(-1) @ vv).transpose(1, 2).reshape(b, n, c)
      return self.proj(x)

  class Block(nn.Module):
    """Pre-LN (ViT, sorter) or post-LN (DistilBERT) block."""

    def __init__(self, dim, heads, hidden, post_ln=False, eps=1e-6):
      super().__init__()
      self.post_ln = post_ln
      self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
      self.attn = Attention(dim, heads)
      self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x, bias=None):
      if self.post_ln:
        x = self.norm1(x + self.attn(x, bias))
        return self.norm2(x + self.mlp(x))
      x = x + self.attn(self.norm1(x), bias)
      return x + self.mlp(self.norm2(x))

  class Model(nn.Module):

    def __init__(self):
      super().__init__()
      dv, dt = v.width, t.width
      self.patch = nn.Conv3d(3, dv, (v.tubelet, v.patch_size, v.patch_size),
                             (v.tubelet, v.patch_size, v.patch_size))
      self.cls = nn.Parameter(torch.zeros(1, 1, dv))
      self.pos = nn.Parameter(torch.randn(1, grid + 1, dv) * 0.02)
      self.temporal = nn.Parameter(torch.zeros(1, tubes, dv))
      self.video_blocks = nn.ModuleList(
          [Block(dv, v.num_heads, v.mlp_dim) for _ in range(v.depth)])
      self.video_norm = nn.LayerNorm(dv, eps=1e-6)
      self.tok = nn.Embedding(t.vocab_size, dt)
      self.tpos = nn.Parameter(torch.randn(1, d.text_len, dt) * 0.02)
      self.tnorm = nn.LayerNorm(dt, eps=1e-12)
      self.text_blocks = nn.ModuleList(
          [Block(dt, t.num_heads, t.mlp_dim, post_ln=True, eps=1e-12) for _ in range(t.depth)])
      self.text_to_video = nn.Linear(dt, dv) if dt != dv else nn.Identity()
      self.type_embed = nn.Parameter(torch.zeros(2, dv))
      self.sort_blocks = nn.ModuleList(
          [Block(dv, s.num_heads, s.mlp_dim) for _ in range(s.depth)])
      self.sort_norm = nn.LayerNorm(dv, eps=1e-6)
      self.sort_head = nn.Linear(dv, k)
      self.video_proj = nn.Linear(dv, config.model.embed_dim)
      self.text_proj = nn.Linear(dt, config.model.embed_dim)

    def forward(self, video, ids, mask, order):
      b = video.shape[0]
      x = self.patch(video).flatten(3).permute(0, 2, 3, 1)  # [B, tubes, grid, D]
      x = x + self.pos[:, None, 1:] + self.temporal[:, :, None]
      idx = torch.rand(b, tubes, grid).argsort(-1)[..., :kept]
      x = torch.gather(x, 2, idx[..., None].expand(-1, -1, -1, x.shape[-1])).flatten(1, 2)
      x = torch.cat([(self.cls + self.pos[:, :1]).expand(b, -1, -1), x], 1)
      for blk in self.video_blocks:
        x = blk(x)
      x = self.video_norm(x)
      ids, mask = ids.flatten(0, 1), mask.flatten(0, 1)
      h = self.tnorm(self.tok(ids) + self.tpos[:, :ids.shape[1]])
      bias = ((~mask).float() * -1e9)[:, None, None]
      for blk in self.text_blocks:
        h = blk(h, bias)
      text = h[:, 0].reshape(b, k, -1)
      z = torch.cat([x + self.type_embed[0],
                     self.text_to_video(text.detach()) + self.type_embed[1]], 1)
      for blk in self.sort_blocks:
        z = blk(z)
      logits = self.sort_head(self.sort_norm(z[:, -k:]))
      sort = F.cross_entropy(logits.reshape(b * k, k), order.reshape(-1))
      ve = F.normalize(self.video_proj(x[:, 0]), dim=-1)
      te = F.normalize(self.text_proj(F.relu(text)).mean(1), dim=-1)
      sim = ve @ te.t() / config.temperature
      target = torch.arange(b)
      contrastive = F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)
      return contrastive + config.sort_weight * sort

  def make_batch(batch_size):
    g = torch.Generator().manual_seed(0)
    video = torch.randn(batch_size, 3, d.num_frames, d.image_size, d.image_size, generator=g)
    ids = torch.randint(0, t.vocab_size, (batch_size, k, text_len), generator=g)
    mask = torch.ones(batch_size, k, text_len, dtype=torch.bool)
    order = torch.stack([torch.randperm(k, generator=g) for _ in range(batch_size)])
    return video, ids, mask, order

  return Model(), make_batch


def _stepper(config: ml_collections.ConfigDict, text_len: int, threads: int | None):
  """(step function timing one AdamW step in seconds, report fields) for the config."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  threads = threads or len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  model, make_batch = _build(config, text_len)
  opt = torch.optim.AdamW(model.parameters(), lr=config.optim.lr,
                          betas=(config.optim.b1, config.optim.b2),
                          weight_decay=config.optim.weight_decay)
  batch = make_batch(config.batch_size)
  info = dict(torch_version=torch.__version__, torch_threads=threads,
              torch_batch_size=config.batch_size,
              torch_params=sum(p.numel() for p in model.parameters()), torch_text_len=text_len)
  last = {}

  def step() -> float:
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = model(*batch)
    loss.backward()
    opt.step()
    last["loss"] = loss
    return time.perf_counter() - t0

  return step, info, last


def _report(config, times: list[float], info: dict, last: dict) -> dict:
  step = statistics.median(times)
  return dict(torch_step_time_s=step, torch_clips_per_s=config.batch_size / step,
              torch_step_times_s=times, torch_loss=float(last["loss"]), **info)


def benchmark(config: ml_collections.ConfigDict, text_len: int, steps: int = 8,
              warmup: int = 1, threads: int | None = None) -> dict:
  """Times `steps` AdamW steps (forward, backward, update) after `warmup`; returns the report."""
  step, info, last = _stepper(config, text_len, threads)
  for _ in range(warmup):
    step()
  return _report(config, [step() for _ in range(steps)], info, last)


def serve(config: ml_collections.ConfigDict, text_len: int, warmup: int) -> None:
  """The subprocess side of `SideBySide`: stdin line N > 0 runs one untimed step and N timed
  ones and prints their times as a JSON list; 0 prints the report and returns."""
  step, info, last = _stepper(config, text_len, None)
  for _ in range(warmup):
    step()
  print("READY", flush=True)
  times = []
  for line in sys.stdin:
    n = int(line)
    if not n:
      break
    step()  # settles the threads after the other process's block
    block = [step() for _ in range(n)]
    times += block
    print(json.dumps(block), flush=True)
  print(json.dumps(_report(config, times, info, last)), flush=True)


def run_in_subprocess(config: ml_collections.ConfigDict, text_len: int, steps: int,
                      warmup: int) -> dict:
  """`benchmark` in a fresh Python process (PyTorch and TensorFlow in one process can crash).

  Raises:
    RuntimeError: PyTorch is missing or the run failed (its stderr is in the message).
  """
  side = SideBySide(config, text_len, warmup)
  side.run(steps)
  return side.close()


class SideBySide:
  """The PyTorch model in a subprocess, stepping a block at a time when asked.

  `python -m tvts_jax.perf --compare_torch` alternates blocks of its own steps with blocks of
  these, so both are timed over the same minutes: on a shared machine whose speed drifts
  within minutes, a run of one after the other is not a comparison.
  Each block starts with one untimed step on either side, which lets the other process's
  threads go quiet. The subprocess is idle (blocked on its stdin) while ours runs.
  """

  def __init__(self, config: ml_collections.ConfigDict, text_len: int, warmup: int):
    """Starts the subprocess; returns once its model is built and warmed up.

    Raises:
      RuntimeError: PyTorch is missing or the subprocess failed (its stderr is in the message).
    """
    code = ("import json, sys; from ml_collections import ConfigDict; "
            "from tvts_jax.perf import torch_ref as b; "
            "b.serve(ConfigDict(json.loads(sys.argv[1])), *map(int, sys.argv[2:]))")
    self._stderr = tempfile.TemporaryFile("w+")  # a pipe nobody reads could fill and block
    self._proc = subprocess.Popen(
        [sys.executable, "-c", code, config.to_json(), str(text_len), str(warmup)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    self._read()  # READY

  def _read(self) -> str:
    line = self._proc.stdout.readline()
    if not line:
      self._proc.wait()
      self._stderr.seek(0)
      raise RuntimeError("the PyTorch reference benchmark failed (pip install -e "
                         "'.[torch]'?):\n" + self._stderr.read()[-3000:])
    return line

  def run(self, steps: int) -> list[float]:
    """Runs one untimed and `steps` timed steps; returns their times."""
    self._proc.stdin.write(f"{steps}\n")
    self._proc.stdin.flush()
    return json.loads(self._read())

  def close(self) -> dict:
    """Ends the subprocess; returns its report over all blocks (as `benchmark`'s)."""
    self._proc.stdin.write("0\n")
    self._proc.stdin.flush()
    report = json.loads(self._read())
    self._proc.wait()
    self._stderr.close()
    return report


def main(argv) -> None:
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  from absl import flags  # pylint: disable=g-import-not-at-top
  from tvts_jax import config_schema  # pylint: disable=g-import-not-at-top
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  config = config_schema.validate(FLAGS.config)
  text_len = FLAGS.text_len or config.data.text_len
  if not 2 <= text_len <= config.data.text_len:
    raise ValueError(f"--text_len={text_len} must be in [2, config.data.text_len="
                     f"{config.data.text_len}]")
  report = benchmark(config, text_len, FLAGS.steps, FLAGS.warmup)
  print(f"PyTorch {report['torch_version']} ({report['torch_threads']} threads), batch "
        f"{config.batch_size}, text_len {text_len}: step {report['torch_step_time_s']:.3f} s "
        f"(median of {FLAGS.steps}), {report['torch_clips_per_s']:.3f} clips/s", flush=True)
  print(json.dumps(report))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  config_flags.DEFINE_config_file("config", os.path.join(_here, "configs", "small.py"),
                                  "Config file (shapes).", lock_config=True)
  flags.DEFINE_integer("text_len", None, "Transcript length (default: config.data.text_len).")
  flags.DEFINE_integer("steps", 8, "Timed steps; the median is reported.")
  flags.DEFINE_integer("warmup", 1, "Untimed steps first.")
  app.run(main)
