"""No Train No Gain's Appendix C grids as sweep presets for the comparison runner.

``appendix_c(family)`` returns ``{method: sweep dict}`` (``sweep.py``) for ``family`` = "bert"
or "t5", one entry per method the paper tuned, with the values it searched:

* layer stacking (C.1): doubling at (2.4, 7.2), (3, 7.2) or (7.2, 9.6) RST hours of its 24-hour
  budget, given here as the budget fractions hours / 24, so a smaller budget stacks at the same
  shares of it (the paper's choice, (3, 7.2), is the default ``grow_at``);
* layer dropping (C.2): gamma_f. The paper plots its grid (Figure 8) without listing it and keeps
  100 for BERT and 20 for T5; we search {20, 50, 100}, and for T5 also the lower LR it tried
  (1e-2 against 2e-2);
* selective backprop (C.3): beta in {1, 2, 3};
* RHO loss (C.4): the mega-batch. Figure 10a's sizes are not listed either; we search 2x (the
  choice), 4x and 10x (Mindermann et al.'s) the batch, as ``method.rho_loss.mega_batch`` rows;
* Lion (C.5, Table 5): BERT LR {1e-4, 3e-4, 5e-4, 7e-4} x WD {0.03, 0.05, 0.07, 0.1}; T5 LR
  {5e-4, 7.5e-4, 1e-3, 2.5e-3, 5e-3, 2e-2}, WD 0; betas (0.9, 0.99);
* Sophia-G (C.6): BERT rho {0.01, 0.03, 0.05, 0.1} (its first search) x LR {1e-4, 4e-4, 1e-3}
  (its NaN-free low LR, its choice, AdamW's) at WD 0.015; T5 LR {2e-2, 5e-3, 2.5e-3, 1e-3, 7.5e-4,
  5e-4} x rho {0.05, 0.01}.

``lr_scale`` multiplies every LR of the grids (a small model trained at another base LR than
the paper's keeps the grids' spread around its own), ``batch_size`` sizes the mega-batches.
Lion and Sophia settings also take the paper's other optimizer values (``optim/presets.py``).
"""
from raptr_jax.optim.presets import PAPER_OPTIMIZERS

REFERENCE_HOURS = 24.0
STACKING_HOURS = ((2.4, 7.2), (3.0, 7.2), (7.2, 9.6))


def _optimizer_base(family: str, name: str, skip=("peak",)) -> list[str]:
  values = PAPER_OPTIMIZERS[family][name]
  return [f"optimizer.name={name}"] + [f"optimizer.{k}={v!r}" for k, v in values.items() if k not in skip]


def appendix_c(family: str = "bert", lr_scale: float = 1.0, batch_size: int = 0) -> dict:
  """{method: sweep dict} of the Appendix C grids (see the module docstring)."""
  if family not in ("bert", "t5"):
    raise ValueError(f"Appendix C tuned BERT and T5; family must be 'bert' or 't5', got {family!r}")
  lr = lambda values: [float(f"{v * lr_scale:.3g}") for v in values]
  stacking = {"overrides": ["method.name=stacking"],
              "grid": {"method.stacking.grow_at": [tuple(round(h / REFERENCE_HOURS, 4) for h in hours)
                                                   for hours in STACKING_HOURS]}}
  pld = {"overrides": ["method.name=pld"], "grid": {"method.pld.gamma_f": [20.0, 50.0, 100.0]}}
  if family == "t5":
    pld["grid"]["schedule.peak"] = lr([1e-2, 2e-2])
  methods = {
      "stacking": stacking,
      "pld": pld,
      "selective_backprop": {"overrides": ["method.name=selective_backprop"],
                             "grid": {"method.selective_backprop.scale": [1.0, 2.0, 3.0]}},
      "rho_loss": {"overrides": ["method.name=rho_loss", "data.holdout_share=0.2", "data.resample_noise=False"]},
  }
  if batch_size:  # without it, the method's default 2x only
    methods["rho_loss"]["grid"] = {"method.rho_loss.mega_batch": [k * batch_size for k in (2, 4, 10)]}
  if family == "bert":
    methods["lion"] = {"overrides": _optimizer_base(family, "lion", ("peak", "weight_decay")),
                       "grid": {"schedule.peak": lr([1e-4, 3e-4, 5e-4, 7e-4]),
                                "optimizer.weight_decay": [0.03, 0.05, 0.07, 0.1]}}
    methods["sophia_g"] = {"overrides": _optimizer_base(family, "sophia_g", ("peak", "rho")),
                           "grid": {"schedule.peak": lr([1e-4, 4e-4, 1e-3]), "optimizer.rho": [0.01, 0.03, 0.05, 0.1]}}
  else:
    methods["lion"] = {"overrides": _optimizer_base(family, "lion"),
                       "grid": {"schedule.peak": lr([5e-4, 7.5e-4, 1e-3, 2.5e-3, 5e-3, 2e-2])}}
    methods["sophia_g"] = {"overrides": _optimizer_base(family, "sophia_g", ("peak", "rho")),
                           "grid": {"schedule.peak": lr([2e-2, 5e-3, 2.5e-3, 1e-3, 7.5e-4, 5e-4]),
                                    "optimizer.rho": [0.05, 0.01]}}
  return methods
