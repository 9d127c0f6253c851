"""Masked-language-model pretraining of a BERT encoder (crammed BERT / RaPTr BERT-base).

    python -m raptr_jax.main --config=configs/bert.py              # CPU-sized default, built-in corpus
    python -m raptr_jax.main --config=configs/bert.py:tiny         # seconds; what the tests run
    python -m raptr_jax.rst calibrate --config=configs/bert.py:crammed \\
        data.source=c4 data.tfds_data_dir=DIR data.vocab_path=T5_SPM   # once per machine
    python -m raptr_jax.main --config=configs/bert.py:crammed \\
        --config.data.source=c4 --config.data.tfds_data_dir=DIR --config.data.vocab_path=T5_SPM
    python -m raptr_jax.main --config=configs/bert.py:crammed_stacking \\
        --config.data.source=c4 --config.data.tfds_data_dir=DIR --config.data.vocab_path=T5_SPM
    python -m raptr_jax.main --config=configs/bert.py:msg --config.data.source=wikipedia_books ...   # or :lemon, :bert2bert
    python -m raptr_jax.hf import --config=configs/bert.py --hf_dir=BERT_SMALL_DIR --workdir=runs/bert-small
    python -m raptr_jax.main --config=configs/bert.py:bert2bert_pretrained --config.init.source=runs/bert-small ...
    python -m raptr_jax.main --config=configs/bert.py:raptr_base --config.data.source=wikipedia_books ...
    python -m raptr_jax.main --config=configs/bert.py:random_ltd_large --config.data.source=... ...
    python -m raptr_jax.main --config=configs/bert.py:crammed_selective_backprop --config.data.source=c4 ...
    python -m raptr_jax.il_losses build --config=configs/bert.py:crammed_rho_loss data.source=c4 ...  # once
    python -m raptr_jax.main --config=configs/bert.py:crammed_rho_loss --config.data.source=c4 ...

Presets:
* default: a ~4M-parameter encoder (4 layers, d=256) on the Shakespeare corpus shipped in the
  package, seq 128, batch 32, 300 steps; minutes on 2 cores. Its architecture is this project's
  compact encoder, neither original nor crammed BERT: pre-norm RMSNorm, no biases, no token types,
  no embedding norm, tanh-GELU MLP, learned positions, a tied head without the MLM transform
  (``crammed`` below is crammed BERT; an imported checkpoint is ``BertForMaskedLM``, see
  ``raptr_jax/models/presets.py``).
* ``tiny``: 2 layers, d=64, 30 steps.
* ``crammed``: No Train No Gain section 3 (crammed BERT, Geiping & Goldstein 2022, the
  ``crammed_bert`` architecture of ``raptr_jax/models/presets.py``: pre-norm LayerNorm, no linear
  biases, gated GELU, scaled sinusoidal positions, embedding LayerNorm, MLM transform head, tied):
  16 layers of BERT-base width (d 768, 12 heads, a 3072-unit MLP input split into value and gate:
  mlp_dim 1536; ~120M parameters with a 32768 vocabulary), seq 128, batch 1536, AdamW
  b=(0.9, 0.98), eps 1e-12, weight decay 0.01, one-cycle LR peaking at 1e-3 half-way, gradient
  clipping 0.5, MLM 15% with sparse prediction, a 24-hour reference-system-time budget (the
  paper's longest; 6 and 12 via --config.budget.value). Needs an RST table: calibrate first.
* ``crammed_stacking``: ``crammed`` with No Train No Gain's layer stacking (Section 4.1, C.1):
  4 -> 8 -> 16 layers at 3 h and 7.2 h of the 24-hour budget (12.5% and 30%; any budget.value
  keeps the fractions), each layer copied on top, new layers with fresh optimizer state.
* ``crammed_selective_backprop``: ``crammed`` with selective backprop as NTNG ran it (Section
  5.1, C.3): beta = 1 (about half the scored rows kept), a 5000-loss history; scoring passes
  charged on the RST clock (``--config.budget.free_scoring=True``: NTNG's Section 5.4 ablation).
* ``crammed_rho_loss``: ``crammed`` with RHO loss (Section 5.2, C.4): IL model of the same
  architecture trained for 6 h RST on a 20% holdout (build the store first, command above), a
  mega-batch of 2 x 1536 rows, top 1536 by reducible loss.
* ``tiny_selective_backprop``, ``tiny_rho_loss``: the tiny model with each (the tests).
* ``raptr_base``: RaPTr Appendix D.4 BERT-base baseline: 12 layers, batch 256, 675k steps,
  10k warmup steps, peak 1e-4, linear decay to 0 (seq 128 is our choice; the appendix does not
  say). AdamW otherwise at our defaults.
* ``msg``, ``lemon``, ``bert2bert``: RaPTr Table 2's depth-growth comparisons on that BERT-base,
  300k steps, equal stage lengths: MSG 6-9-12 (mask ramp over 5000 steps, MSG's grow_time),
  LEMON 6-9-12 (consecutive zero-output blocks), bert2BERT 3-6-12 (stacking).
* ``bert2bert_pretrained``, ``lemon_pretrained``: growth of a pretrained BERT imported from a
  transformers checkpoint (``python -m raptr_jax.hf import --config=configs/bert.py --hf_dir=DIR
  --workdir=runs/small``, then ``--config.init.source=runs/small``) into BERT-base before the
  first step (``grow_at=(0.0,)``, function-preserving), from a 12-layer 256-wide BERT (Turc et
  al.'s BERT L-12 H-256 A-4) to BERT-base (d 768, 12 heads, MLP 3072): bert2BERT's copies with
  fan-in division (its paper grew BERT-small, d 512, which is not a whole divisor of 768: copies
  must be equal in number to keep LayerNorm exact) or LEMON's random fan-in split (its paper also
  grew depth, 6 -> 12 layers; zero-output blocks preserve only pre-norm models, so depth growth
  of a post-LN BERT is refused); then RaPTr D.4's BERT-base recipe for 300k steps.
* ``large_mnli`` / ``mnli``: the fine-tuning recipe random-LTD's Appendix D.2 used for MNLI
  (Megatron's: 10 epochs, batch 128, LR 1e-5; linear warmup over 10% and decay, weight decay
  0.01 are our choice, the appendix does not give them) on BERT-large / the default model, for
  ``python -m raptr_jax.evaluate --tasks=finetune_glue`` with GLUE prepared in tfds
  (``downstream.finetune.tfds_data_dir``).
* ``large`` / ``random_ltd_large``: random-LTD Section 4.2 / Appendix D.2: BERT-large (24
  layers, d 1024, 16 heads), seq 512, batch 1024, 2M steps, Megatron's BERT recipe (peak 1e-4,
  10k warmup steps, linear decay). random-LTD-2: 128 kept tokens growing by 16 every 38B tokens
  (full after 912B of 1049B), middle 22 layers, LayerToken LR: 31.1% of the layer-tokens saved.
"""
from raptr_jax.config import base_config, tiny_preset
from raptr_jax.models.presets import apply_architecture
from raptr_jax.optim.presets import apply_paper_optimizer


def get_config(preset: str = ""):
  c = base_config()
  c.model.update(family="bert", d_model=256, num_layers=4, num_heads=4, head_dim=64, mlp_dim=1024,
                 gated_mlp=False, activation="gelu", position="learned", max_len=512,
                 tied_embeddings=True)
  c.data.update(objective="mlm", seq_len=128, batch_size=32, mlm_rate=0.15, max_predictions=-1)
  c.budget.unit, c.budget.value = "steps", 300
  c.schedule.update(name="cosine", peak=2e-3, warmup=0.05, final=0.1)
  c.optimizer.update(weight_decay=0.01)
  c.eval.update(every=0.2, batches=8)
  c.checkpoint.every = 100
  if preset in ("tiny", "tiny_selective_backprop", "tiny_rho_loss"):
    tiny_preset(c)
    if preset == "tiny_selective_backprop":
      c.method.name = "selective_backprop"
      c.method.selective_backprop.history = 64
    elif preset == "tiny_rho_loss":
      use_rho_loss(c, il_budget=20)
      c.method.rho_loss.store = "il_store/tiny_bert"
  elif preset in ("crammed", "crammed_stacking", "crammed_selective_backprop", "crammed_rho_loss"):
    apply_architecture(c, "crammed_bert")  # models/presets.py, option by option
    c.model.update(d_model=768, num_layers=16, num_heads=12, head_dim=64, mlp_dim=1536)  # 3072 split: value, gate
    c.data.update(seq_len=128, batch_size=1536)
    c.budget.unit, c.budget.value = "rst_hours", 24
    apply_paper_optimizer(c, "bert", "adamw")
    c.schedule.update(name="one_cycle", warmup=0.5, final=0.0)
    c.eval.update(every=0.05, batches=64)
    c.checkpoint.every = 2000
    c.log.every = 50
    if preset == "crammed_stacking":  # 4 -> 8 -> 16 layers at 3 h and 7.2 h of 24 h (12.5%, 30%)
      c.method.name = "stacking"
      c.method.stacking.update(depths=(4, 8, 16), grow_at=(0.125, 0.3), mode="stack", optimizer_state="fresh")
    elif preset == "crammed_selective_backprop":  # NTNG Section 5.1, C.3: beta 1, history 5000
      c.method.name = "selective_backprop"
      c.method.selective_backprop.update(scale=1.0, history=5000, candidates=0)
    elif preset == "crammed_rho_loss":  # NTNG Section 5.2, C.4: mega-batch 2x, IL model 6 h RST on 20%
      use_rho_loss(c, il_budget=6)
  elif preset in ("raptr_base", "msg", "lemon", "bert2bert", "bert2bert_pretrained", "lemon_pretrained"):
    c.model.update(d_model=768, num_layers=12, num_heads=12, head_dim=64, mlp_dim=3072)
    c.data.update(seq_len=128, batch_size=256)
    c.budget.value = 675_000
    c.schedule.update(name="linear", peak=1e-4, warmup=10_000 / 675_000, final=0.0)
    c.eval.update(every=0.02, batches=64)
    c.checkpoint.every = 10_000
    c.log.every = 100
    if preset != "raptr_base":  # RaPTr Table 2: growth at 300k steps
      c.budget.value = 300_000
      c.schedule.warmup = 10_000 / 300_000
      c.method.name = "growth"
    if preset in ("msg", "lemon", "bert2bert"):  # depth growth, equal stage lengths
      c.method.growth.update(operator=preset, grow_at=(1 / 3, 2 / 3),
                             num_layers=(3, 6, 12) if preset == "bert2bert" else (6, 9, 12),
                             ramp=5000 / 300_000)  # MSG's grow_time: 5000 steps
    elif preset != "raptr_base":
      # Growth of an imported BERT (python -m raptr_jax.hf import ... --workdir=runs/small, then
      # --config.init.source=runs/small; its architecture options come with it) before the first
      # step: a 12-layer, 256-wide BERT (Turc et al.'s L-12 H-256 A-4), each hidden dimension copied 3
      # times (whole multiples keep LayerNorm's statistics exact).
      c.method.growth.update(operator=preset.removesuffix("_pretrained"), grow_at=(0.0,), d_model=(256, 768),
                             num_heads=(4, 12), mlp_dim=(1024, 3072))
  elif preset == "mnli":  # the default model with random-LTD D.2's MNLI fine-tuning recipe
    c.downstream.finetune.update(epochs=10.0, batch_size=128, lr=1e-5, warmup=0.1, weight_decay=0.01,
                                 seq_len=128, glue_task="mnli")
  elif preset in ("large", "random_ltd_large", "large_mnli"):
    c.model.update(d_model=1024, num_layers=24, num_heads=16, head_dim=64, mlp_dim=4096)
    c.data.update(seq_len=512, batch_size=1024)
    c.budget.unit, c.budget.value = "steps", 2_000_000
    c.optimizer.update(name="adamw", b1=0.9, b2=0.999, weight_decay=0.01, grad_clip=1.0)
    c.schedule.update(name="linear", peak=1e-4, warmup=10_000 / 2_000_000, final=0.0)
    c.eval.update(every=0.01, batches=64)
    c.checkpoint.every = 10_000
    c.log.every = 100
    if preset == "large_mnli":  # random-LTD D.2 (Megatron's recipe): MNLI 10 epochs, batch 128, LR 1e-5
      c.downstream.finetune.update(epochs=10.0, batch_size=128, lr=1e-5, warmup=0.1, weight_decay=0.01,
                                   seq_len=512, glue_task="mnli")
    if preset == "random_ltd_large":  # 24 increments of 16, one per 38B of 512 x 1024 x 2M tokens
      c.method.name = "random_ltd"
      c.method.random_ltd.update(min_value=128, max_value=512, seq_per_step=16, lr="layer_tokens",
                                 require_fraction=24 * 38e9 / (512 * 1024 * 2e6))
  elif preset:
    raise ValueError(f"unknown preset {preset!r} for configs/bert.py; use tiny, tiny_selective_backprop, "
                     "tiny_rho_loss, crammed, crammed_stacking, crammed_selective_backprop, crammed_rho_loss, "
                     "raptr_base, msg, lemon, bert2bert, bert2bert_pretrained, lemon_pretrained, large, "
                     "random_ltd_large, large_mnli, mnli or none")
  return c


def use_rho_loss(c, il_budget: float):
  """RHO loss as NTNG ran it: a 20% holdout (by example id) for the IL model, masks fixed per
  example so the IL and training losses see the same ones, a mega-batch of 2x the batch."""
  c.method.name = "rho_loss"
  c.method.rho_loss.update(mega_batch=0, il_budget=il_budget)
  c.data.update(holdout_share=0.2, holdout_part="rest", resample_noise=False)
