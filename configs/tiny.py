"""The smallest config that exercises every code path; used by the tests."""
from tvts_jax import config_schema, evaluators


def get_config():
  c = config_schema.base_config()
  c.batch_size = 8
  c.total_steps = 10
  c.log_every_steps = 2
  c.evals = evaluators.standard(sort_every_steps=5)
  c.checkpoint_every_steps = 5
  c.optim.lr = 1e-3
  c.model.embed_dim = 16
  c.model.video.update(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, tubelet=2,
                       keep_ratio=0.25)
  c.model.text.update(arch="tvts", vocab_size=64, max_positions=0, ln_eps=1e-6, width=32,
                      depth=1, num_heads=2, mlp_dim=64)
  c.model.sorter.update(depth=1, num_heads=2, mlp_dim=64)
  c.data.update(num_frames=4, image_size=32, resize_short=32, clip_seconds=(1,),
                gap_seconds=0.5, text_len=8, shuffle_buffer=16, eval_batches=2)
  c.demo.update(num_train_videos=32, num_eval_videos=16, vocab_size=64)
  return c
