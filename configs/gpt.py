"""Causal language modelling with a GPT-style decoder on the built-in corpus.

    python -m raptr_jax.main --config=configs/gpt.py
    python -m raptr_jax.main --config=configs/gpt.py:tiny
"""
from raptr_jax.config import base_config, tiny_preset


def get_config(preset: str = ""):
  c = base_config()
  c.data.objective = "causal_lm"
  c.budget.unit, c.budget.value = "steps", 300
  c.model.update(d_model=256, num_layers=4, num_heads=4, head_dim=64, mlp_dim=1024,
                 gated_mlp=False, activation="gelu", position="learned", max_len=512,
                 tied_embeddings=True)
  c.data.update(seq_len=128, batch_size=32)
  c.schedule.update(name="cosine", peak=2e-3, warmup=0.05, final=0.1)
  c.eval.update(every=0.2, batches=8)
  c.checkpoint.every = 100
  if preset == "tiny":
    tiny_preset(c, steps=20, mlp_dim=256)
  elif preset:
    raise ValueError(f"unknown preset {preset!r} for configs/gpt.py; use tiny or none")
  return c
