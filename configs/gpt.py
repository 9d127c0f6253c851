"""Causal language modelling with a GPT-style decoder on the built-in corpus.

    python -m raptr_jax.main --config=configs/gpt.py
    python -m raptr_jax.main --config=configs/gpt.py:tiny
    python -m raptr_jax.main --config=configs/gpt.py:random_ltd        # random-LTD on the default
    python -m raptr_jax.main --config=configs/gpt.py:tiny_random_ltd   # seconds; what tests run
    python -m raptr_jax.main --config=configs/gpt.py:interlocking      # 2-wise interlocking backprop, K = 4
    python -m raptr_jax.main --config=configs/gpt.py:gpt3_350m_random_ltd \\
        --config.data.source=... --config.data.vocab_path=...          # the paper's, accelerators
    python -m raptr_jax.aot --config=configs/gpt.py:gpt3_1.3b_random_ltd --topology=v5p-64  # does it fit

Presets:
* default: a ~3M-parameter decoder (4 layers, d=256, learned positions, tied head), seq 128,
  batch 32, 300 steps.
* ``tiny``: 2 layers, d=64, 20 steps. ``tiny_random_ltd``: 4 layers, random-LTD on layers 1-2,
  kept length 16 -> 64 by 16 over 70% of the steps.
* ``random_ltd``: the default with random-LTD at the paper's ratios: kept length S/16 -> S in
  steps of 16 over 70% of the budget on all but the first and last layer, LayerToken LR.
* ``interlocking`` / ``tiny_interlocking``: interlocking backprop (Gomez et al. 2022, Figure 6 at
  small size): 12 layers in K = 4 components of 3, 2-wise, auxiliary heads of 1 block (the
  paper's 2-block heads on 6-block components, same ratio) with the tied embedding as output
  layer (Appendix B.3); each component clips its own gradient.
  ``--config.method.interlocking.n=1`` is local learning, ``n=4`` end-to-end. The tiny one: 4
  layers, one per component, heads of 1 block.
* ``gpt3_350m`` / ``gpt3_350m_random_ltd``: random-LTD Section 4.1 / Appendix D.1: GPT-3 350M
  (24 layers, d 1024, 16 heads, learned positions), seq 2048, batch 256 (0.5M tokens), 300B
  tokens, AdamW b2 0.95, weight decay 0.1, peak LR 3e-4 with 375M warmup tokens, cosine to 10%
  (GPT-3's recipe, which the paper follows through Megatron-DeepSpeed). random-LTD: 128 -> 2048
  kept tokens by 16 every 1.75B tokens (full after 210B), middle 22 layers, LayerToken LR; 121
  kept lengths, each a compile.
* ``gpt3_1.3b`` / ``gpt3_1.3b_random_ltd``: the same recipe at GPT-3 1.3B (24 layers, d 2048, 16
  heads of 128, MLP 8192, as Megatron-DeepSpeed's 1.3B), batch 512 (1M tokens), peak LR 2e-4
  (GPT-3 Table 2.1's XL).
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
  if preset in ("tiny", "tiny_random_ltd", "tiny_interlocking"):
    tiny_preset(c, steps=20, mlp_dim=256)
    if preset == "tiny_random_ltd":
      c.model.num_layers = 4
      c.method.name = "random_ltd"
      c.method.random_ltd.update(min_value=16, seq_per_step=16, require_fraction=0.7)
    if preset == "tiny_interlocking":
      c.model.num_layers = 4
      c.method.name = "interlocking"
      c.method.interlocking.update(components=4, n=2, aux_head_layers=1)
  elif preset == "random_ltd":
    c.method.name = "random_ltd"
  elif preset == "interlocking":
    c.model.num_layers = 12
    c.method.name = "interlocking"
    c.method.interlocking.update(components=4, n=2, aux_head_layers=1)
  elif preset in ("gpt3_350m", "gpt3_350m_random_ltd", "gpt3_1.3b", "gpt3_1.3b_random_ltd"):
    large = preset.startswith("gpt3_1.3b")
    c.model.update(d_model=2048 if large else 1024, num_layers=24, num_heads=16, head_dim=128 if large else 64,
                   mlp_dim=8192 if large else 4096, max_len=2048, remat="dots")
    c.data.update(seq_len=2048, batch_size=512 if large else 256)
    c.budget.unit, c.budget.value = "tokens", 300e9
    c.optimizer.update(name="adamw", b1=0.9, b2=0.95, weight_decay=0.1, grad_clip=1.0)
    c.schedule.update(name="cosine", peak=2e-4 if large else 3e-4, warmup=375e6 / 300e9, final=0.1)
    c.eval.update(every=0.01, batches=64)
    c.checkpoint.every = 2000
    c.log.every = 100
    if preset.endswith("random_ltd"):
      c.method.name = "random_ltd"
      c.method.random_ltd.update(min_value=128, max_value=2048, seq_per_step=16,
                                 require_fraction=210 / 300, lr="layer_tokens", max_compiles=121)
  elif preset:
    raise ValueError(f"unknown preset {preset!r} for configs/gpt.py; use tiny, tiny_random_ltd, "
                     "tiny_interlocking, random_ltd, interlocking, gpt3_350m, gpt3_350m_random_ltd, gpt3_1.3b, "
                     "gpt3_1.3b_random_ltd or none")
  return c
