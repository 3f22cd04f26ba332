"""What `python main.py` runs by default: a small TVTS on the built-in synthetic videos.

Trains on 2 CPU cores in about a quarter of an hour. The data (narrated synthetic videos,
written as TFRecords) and its sentencepiece tokenizer are generated into the workdir on the
first run.
"""
from tvts_jax import config_schema, evaluators


def get_config():
  c = config_schema.base_config()
  c.batch_size = 32
  c.total_steps = 2_000
  c.log_every_steps = 50
  c.evals = evaluators.standard(sort_every_steps=500)
  c.checkpoint_every_steps = 500
  c.optim.lr = 5e-4
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.05
  c.optim.grad_clip_norm = 1.0

  c.model.embed_dim = 64
  c.model.video.update(width=128, depth=4, num_heads=4, mlp_dim=512, patch_size=16,
                       tubelet=2, keep_ratio=0.5,
                       # From scratch, a time signature of the patch embeddings' scale is what
                       # lets the sorter leave chance early (zeros: chance for 1000+ steps).
                       temporal_init="normal", temporal_init_std=1.0)
  c.model.text.update(arch="tvts", vocab_size=256, max_positions=0, ln_eps=1e-6, width=128,
                      depth=2, num_heads=4, mlp_dim=512)
  c.model.sorter.update(depth=2, num_heads=4, mlp_dim=512)

  c.data.update(num_frames=8, image_size=64, resize_short=64, clip_seconds=(2, 3),
                gap_seconds=1.0, text_len=16, shuffle_buffer=500, eval_batches=8)
  c.demo.update(num_train_videos=2_000, num_eval_videos=256, vocab_size=256)
  return c
