"""The optimizer settings No Train No Gain used, per model family (Section 3, Appendix C.5/C.6).

``apply_paper_optimizer(cfg, family, name)`` writes them into a run config (``optimizer.*`` and
``schedule.peak``). BERT runs use the one-cycle schedule and T5 runs cosine with warmup (set by
the family's config); every T5 run multiplies the LR by max(1e-3, RMS(param)) as nanoT5 does.
"""
PAPER_OPTIMIZERS = {
    "bert": {
        "adamw": dict(peak=1e-3, b1=0.9, b2=0.98, eps=1e-12, weight_decay=0.01, grad_clip=0.5),
        "lion": dict(peak=7e-4, b1=0.9, b2=0.99, weight_decay=0.1, grad_clip=0.5),
        "sophia_g": dict(peak=4e-4, b1=0.965, b2=0.99, weight_decay=0.015, rho=0.01, grad_clip=0.5),
    },
    "t5": {
        "adamw": dict(peak=2e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0, rms_scaling=True),
        "lion": dict(peak=7.5e-4, b1=0.9, b2=0.99, weight_decay=0.0, grad_clip=1.0, rms_scaling=True),
        "sophia_g": dict(peak=1e-3, b1=0.965, b2=0.99, weight_decay=0.0, rho=0.01, grad_clip=1.0, rms_scaling=True),
    },
}


def apply_paper_optimizer(cfg, family: str, name: str):
  """Sets ``cfg.optimizer`` and ``cfg.schedule.peak`` to No Train No Gain's choice; returns cfg."""
  if family not in PAPER_OPTIMIZERS or name not in PAPER_OPTIMIZERS[family]:
    known = {f: sorted(v) for f, v in PAPER_OPTIMIZERS.items()}
    raise ValueError(f"no paper optimizer preset for family {family!r} and optimizer {name!r}; known: {known}")
  values = dict(PAPER_OPTIMIZERS[family][name])
  cfg.schedule.peak = values.pop("peak")
  cfg.optimizer.name = name
  cfg.optimizer.update(values)
  return cfg
