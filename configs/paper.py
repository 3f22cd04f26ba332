"""The reference TVTS recipe: ViT-B/16 from ImageNet MAE, DistilBERT, 16x224^2, K=4, batch 768.

    python main.py --config=configs/paper.py --workdir=gs://BUCKET/tvts \
        --config.init_from=mae:/w/mae_pretrain_vit_base.pth,distilbert:/w/distilbert-base-uncased \
        --config.data.tokenizer=/w/distilbert-base-uncased/tokenizer.json \
        --config.data.train_records='gs://BUCKET/yttemporal/train-*' \
        --config.total_steps=$((20 * NUM_VIDEOS / 768))

Every value is the reference's (docs/recipe.md says where ours departs); the starting points
(README, "The paper's recipe") and the data paths are yours.
"""
from tvts_jax import config_schema, evaluators


def get_config():
  c = config_schema.base_config()
  c.evals = evaluators.standard(sort_every_steps=2_000)
  return c
