"""Span-corruption pretraining of a T5 v1.1 encoder-decoder.

    python -m raptr_jax.main --config=configs/t5.py               # CPU-sized default, built-in corpus
    python -m raptr_jax.main --config=configs/t5.py:tiny          # seconds; what the tests run
    python -m raptr_jax.rst calibrate --config=configs/t5.py:base \\
        data.source=c4 data.tfds_data_dir=DIR data.vocab_path=T5_SPM   # once per machine
    python -m raptr_jax.main --config=configs/t5.py:base \\
        --config.data.source=c4 --config.data.tfds_data_dir=DIR \\
        --config.data.vocab_path=gs://t5-data/vocabs/cc_all.32000/sentencepiece.model
    python -m raptr_jax.main --config=configs/t5.py:base_stacking --config.data.source=c4 ...

Presets:
* default: 4 encoder + 4 decoder layers, d=256, gated-GELU MLP 640, relative position buckets,
  untied head, on the Shakespeare corpus shipped in the package: inputs 128 tokens, targets 29
  (what span corruption with density 0.15 and mean span 3 makes of 141 raw tokens), batch 32,
  300 steps; minutes on 2 CPU cores.
* ``tiny``: 2 + 2 layers, d=64, inputs 64, 30 steps.
* ``base``: No Train No Gain's T5 v1.1-base (following nanoT5): 12 + 12 layers, d 768, 12 heads of
  64, gated-GELU MLP 2048, 32 relative buckets, untied head, inputs 512 / targets 114 tokens,
  batch 144, AdamW with the LR scaled by max(1e-3, RMS(param)), base LR 0.02, no weight
  decay, cosine to 1e-5, gradient clipping 1.0, a 24-hour reference-system-time budget. The
  paper's 10k warmup steps are about 10% of a 24-hour A100 run; warmup is a budget fraction
  here (0.1) so it stays right for any budget. Needs the T5 vocabulary and an RST table.
* ``base_stacking``: ``base`` with No Train No Gain's layer stacking: encoder and decoder grow
  together 3 -> 6 -> 12 layers at 12.5% and 30% of the RST budget (3 h and 7.2 h of 24 h).
"""
from raptr_jax.config import base_config, tiny_preset
from raptr_jax.optim.presets import apply_paper_optimizer


def get_config(preset: str = ""):
  c = base_config()
  c.model.update(family="t5", d_model=256, num_layers=4, num_decoder_layers=4, num_heads=4, head_dim=64,
                 mlp_dim=640, gated_mlp=True, activation="gelu", position="relative",
                 relative_buckets=32, relative_max_distance=128, tied_embeddings=False)
  c.data.update(objective="span_corruption", seq_len=128, target_len=0, batch_size=32,
                noise_density=0.15, mean_noise_span=3.0)
  c.budget.unit, c.budget.value = "steps", 300
  c.schedule.update(name="cosine", peak=3e-3, warmup=0.05, final=0.1)
  c.eval.update(every=0.2, batches=8)
  c.checkpoint.every = 100
  if preset == "tiny":
    tiny_preset(c, num_decoder_layers=2)
  elif preset in ("base", "base_stacking"):
    c.model.update(d_model=768, num_layers=12, num_decoder_layers=12, num_heads=12, head_dim=64,
                   mlp_dim=2048)
    c.data.update(seq_len=512, target_len=114, batch_size=144)
    c.budget.unit, c.budget.value = "rst_hours", 24
    apply_paper_optimizer(c, "t5", "adamw")
    c.schedule.update(name="cosine", warmup=0.1, final=1e-5 / c.schedule.peak)
    c.eval.update(every=0.05, batches=64)
    c.checkpoint.every = 2000
    c.log.every = 50
    if preset == "base_stacking":  # 3 -> 6 -> 12 layers per stack at 12.5% and 30% of the budget
      c.method.name = "stacking"
      c.method.stacking.update(depths=(3, 6, 12), grow_at=(0.125, 0.3), mode="stack", optimizer_state="fresh")
  elif preset:
    raise ValueError(f"unknown preset {preset!r} for configs/t5.py; use tiny, base, base_stacking or none")
  return c
