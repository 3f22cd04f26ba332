"""The middle size used for CPU benchmarks: ViT width 192, depth 4, 8 frames of 112^2."""
from tvts_jax import config_schema, evaluators


def get_config():
  c = config_schema.base_config()
  c.evals = evaluators.standard(sort_every_steps=2_000)
  c.batch_size = 8
  c.model.video.update(width=192, depth=4, num_heads=3, mlp_dim=768, patch_size=16,
                       tubelet=2, keep_ratio=0.25)
  c.model.text.update(arch="tvts", vocab_size=32_000, max_positions=0, ln_eps=1e-6, width=192,
                      depth=2, num_heads=3, mlp_dim=768)
  c.model.sorter.update(depth=2, num_heads=3, mlp_dim=768)
  c.data.update(num_frames=8, image_size=112, resize_short=128)
  return c
