"""UL2 mixture-of-denoisers pretraining of a decoder-only (prefix-LM) transformer.

    python -m raptr_jax.main --config=configs/ul2.py            # CPU-sized default, built-in corpus
    python -m raptr_jax.main --config=configs/ul2.py:tiny       # seconds; what the tests run
    python -m raptr_jax.main --config=configs/ul2.py:paper \\
        --config.data.source=... --config.data.vocab_path=...   # RaPTr paper UL2-1.6B, accelerators

Presets:
* default: a ~3M-parameter decoder (4 layers, d=256) on the Shakespeare corpus shipped in the
  package, seq 128, batch 32, 300 steps; about 5 minutes on 2 CPU cores.
* ``tiny``: 2 layers, d=64, 30 steps (tests, smoke runs).
* ``paper``: RaPTr Appendix D.5 UL2-1.6B: 24 layers, batch 512, seq 512, 400k steps, Adafactor
  (factored second moments, decay 0.8, update clipping 1.0, no momentum, no parameter scaling),
  peak LR 1e-2 with 10k warmup steps and cosine decay to 0.1x peak. The paper does not list the
  width; we use d_model 2048, 16 heads of 128, gated-GELU MLP 8192 (1.6B parameters in the
  layers, 1.74B with the 32k T5 vocabulary's embedding and head). It needs a real dataset and
  vocabulary (data.source, data.vocab_path).
"""
from raptr_jax.config import base_config, tiny_preset


def get_config(preset: str = ""):
  c = base_config()
  c.data.objective = "ul2"
  c.budget.unit, c.budget.value = "steps", 300
  c.model.update(d_model=256, num_layers=4, num_heads=4, head_dim=64, mlp_dim=768)
  c.data.update(seq_len=128, batch_size=32)
  c.schedule.update(name="cosine", peak=3e-3, warmup=0.05, final=0.1)
  c.eval.update(every=0.2, batches=8)
  c.checkpoint.every = 100
  if preset == "tiny":
    tiny_preset(c)
  elif preset == "paper":
    c.budget.value = 400_000
    c.model.update(d_model=2048, num_layers=24, num_heads=16, head_dim=128, mlp_dim=8192,
                   remat="dots")
    c.data.update(seq_len=512, batch_size=512)
    c.optimizer.update(name="adafactor", b1=0.0, decay_rate=0.8, weight_decay=0.0, grad_clip=0.0,
                       multiply_by_parameter_scale=False)
    c.schedule.update(name="cosine", peak=1e-2, warmup=10_000 / 400_000, final=0.1)
    c.eval.update(every=0.025, batches=64)
    c.checkpoint.every = 5000
    c.log.every = 100
  elif preset:
    raise ValueError(f"unknown preset {preset!r} for configs/ul2.py; use tiny, paper or none")
  return c
