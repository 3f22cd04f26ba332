"""The reference TVTS recipe (ViT-B/16, 16x224^2, K=4, batch 768, AdamW 1e-4, step decay).

    python main.py --config=configs/paper.py --workdir=gs://BUCKET/tvts \
        --config.data.train_records=gs://BUCKET/yttemporal/train-* \
        --config.data.tokenizer=gs://BUCKET/spm.model \
        --config.total_steps=$((20 * NUM_VIDEOS / 768))

Every value is the reference's (docs/recipe.md); only the data paths are yours.
"""
from tvts_jax import config_schema, evaluators


def get_config():
  c = config_schema.base_config()
  c.evals = evaluators.standard(sort_every_steps=2_000)
  return c
