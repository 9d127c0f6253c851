"""RaPTr's polynomial experiment (Section 3, Fig. 2, Appendix D.3): a 20-layer residual MLP on
boolean inputs learning basis polynomials of degree 1..10; baseline vs RaPTr vs progressive
layer dropping at 20% fewer layer-FLOPs.

    python -m raptr_jax.experiments.polynomial --config=configs/polynomial.py --workdir=runs/polynomial
    python -m raptr_jax.experiments.polynomial --config=configs/polynomial.py:tiny   # seconds (tests)

Overrides follow the config as section.field=value, e.g. ``train.steps=20000``. Outputs:
results.json, table.md and polynomial.png in the workdir (see raptr_jax/experiments/polynomial.py).

Paper settings (D.3): d = 100, degree k = 10 on the first t = 20 variables, m = 20 basis
polynomials per degree, 20 layers of 4d-hidden ReLU MLPs; RaPTr stages (8/20, {}), (12/20, {}),
(16/20, {}), (20/20, {}) with lengths for an average of 16 layers; PLD theta_bar = 0.6. The paper
does not give the optimizer, LR, batch or steps; ours: Adam, peak 3e-3 (5% warmup, cosine to
1% of peak), batch 256, clip 1.0, 4000 steps (about six minutes for the three methods on 2 CPU
cores). At this size the networks learn the degree 1-4 components; higher degrees need far more
samples (raise train.steps on an accelerator).
"""
import ml_collections

from raptr_jax.config import base_config


def get_config(preset: str = ""):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.methods = ("baseline", "raptr", "pld")
  c.data = dict(dim=100, relevant=20, max_degree=10, per_degree=20)
  c.model = dict(num_layers=20, hidden_mult=4)
  c.train = dict(steps=4000, batch_size=256, lr=3e-3, warmup=0.05, final_lr=0.01, grad_clip=1.0,
                 eval_every=250, eval_samples=32768)
  c.raptr = base_config().method.raptr
  c.raptr.update(schedule="8-12-16-20", fixed=(), lengths="equal", target_average=16.0)
  c.pld = base_config().method.pld
  c.pld.update(theta_bar=0.6, gamma_f=100.0)
  if preset == "tiny":
    c.data.update(dim=16, relevant=8, max_degree=4, per_degree=4)
    c.model.update(num_layers=8, hidden_mult=2)
    c.raptr.update(schedule="4-6-8", target_average=6.5)
    c.train.update(steps=120, batch_size=64, eval_every=40, eval_samples=4096, lr=3e-3)
  elif preset:
    raise ValueError(f"unknown preset {preset!r} of configs/polynomial.py; presets: '' (default), 'tiny'")
  return c
