"""Optimizers as optax transforms, plus the run's learning-rate schedules.

Importable pieces (each an optax ``GradientTransformation[ExtraArgs]``):
``lion`` (optax's own, re-exported), ``sophia_g`` / ``scale_by_sophia_g`` / ``gnb_hessian_estimate``
(Sophia-G), ``sophia_h`` / ``scale_by_sophia_h`` (optax.contrib's Sophia-H), ``scale_by_param_rms`` (Adafactor-style relative step),
``freeze_inactive`` (no update, untouched state for parameters a step leaves out).

``build_optimizer(cfg)`` returns the run's *direction* transform (clipping, moments, RMS scaling,
weight decay); the train step multiplies its output by ``-lr(progress)``, where ``progress`` is
the fraction of the budget in the budget's own unit. That one clock keeps schedules honest across
methods whose steps cost different amounts (No Train No Gain).
"""
import dataclasses

import jax
import jax.numpy as jnp
import optax
from optax import lion  # re-exported: the Lion of Chen et al. 2023 is optax's

from raptr_jax.optim.masking import freeze_inactive, layer_activity
from raptr_jax.optim.schedules import SCHEDULES, learning_rate
from raptr_jax.optim.sophia import (PARAMETERIZATIONS, SophiaGState, gnb_hessian_estimate,
                                    scale_by_sophia_g, scale_by_sophia_h, sophia_g, sophia_h,
                                    sophia_metrics)

OPTIMIZERS = ("adamw", "lion", "sophia_g", "sophia_h", "adafactor")
DEFAULT_BETAS = {"adamw": (0.9, 0.95), "lion": (0.9, 0.99), "sophia_g": (0.965, 0.99),
                 "sophia_h": (0.965, 0.99), "adafactor": (0.0, None)}


def scale_by_param_rms(min_scale: float = 1e-3) -> optax.GradientTransformation:
  """Multiplies each update by max(min_scale, RMS(param)): the relative step of Adafactor, of
  nanoT5's AdamWScale and of No Train No Gain's T5 runs (``optax.scale_by_param_block_rms``)."""
  return optax.scale_by_param_block_rms(min_scale)


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """The run's direction transform and what its update needs from the train step."""
  tx: optax.GradientTransformationExtraArgs
  hessian_interval: int = 0        # Sophia-G: a GNB estimate every k steps (0: never)
  hessian_grad_clip: float = 0.0
  needs_obj_fn: bool = False       # Sophia-H: update takes obj_fn=
  freeze_inactive: bool = False    # freeze layers a step's selection leaves out (update takes active=)


def decay_mask(params, axes_tree):
  """Weight decay on matrices and embeddings, not on norm scales."""
  return jax.tree.map(lambda p, a: "norm" not in a, params, axes_tree,
                      is_leaf=lambda x: isinstance(x, tuple))


def check_optimizer(opt_cfg) -> None:
  if opt_cfg.name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer.name {opt_cfg.name!r}; available: {OPTIMIZERS}")
  if opt_cfg.name == "sophia_g":
    if opt_cfg.sophia_parameterization not in PARAMETERIZATIONS:
      raise ValueError(f"optimizer.sophia_parameterization must be one of {PARAMETERIZATIONS}, "
                       f"got {opt_cfg.sophia_parameterization!r}")
    if opt_cfg.sophia_parameterization == "official" and not opt_cfg.rho > 0:
      raise ValueError(f"optimizer.rho must be > 0 for Sophia, got {opt_cfg.rho}")
    if opt_cfg.hessian_interval < 1:
      raise ValueError(f"optimizer.hessian_interval must be >= 1, got {opt_cfg.hessian_interval}")
  if opt_cfg.name in ("sophia_g", "sophia_h") and opt_cfg.sophia_parameterization == "optax" \
      and not opt_cfg.gamma > 0:
    raise ValueError(f"optimizer.gamma must be > 0 for Sophia, got {opt_cfg.gamma}")


def build_optimizer(opt_cfg, mask=None) -> Optimizer:
  check_optimizer(opt_cfg)
  name = opt_cfg.name
  b1 = DEFAULT_BETAS[name][0] if opt_cfg.b1 is None else opt_cfg.b1
  b2 = DEFAULT_BETAS[name][1] if opt_cfg.b2 is None else opt_cfg.b2
  mu_dtype = jnp.dtype(opt_cfg.mu_dtype) if opt_cfg.mu_dtype else None
  parts = []
  if opt_cfg.grad_clip and opt_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip))
  if name == "adamw":
    parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=opt_cfg.eps, mu_dtype=mu_dtype))
  elif name == "lion":
    parts.append(optax.scale_by_lion(b1=b1, b2=b2, mu_dtype=mu_dtype))
  elif name == "sophia_g":
    parts.append(scale_by_sophia_g(b1=b1, b2=b2, rho=opt_cfg.rho, gamma=opt_cfg.gamma,
                                   parameterization=opt_cfg.sophia_parameterization, mu_dtype=mu_dtype))
  elif name == "sophia_h":
    parts.append(scale_by_sophia_h(b1=b1, b2=b2, gamma=opt_cfg.gamma,
                                   update_interval=opt_cfg.hessian_interval))
  elif name == "adafactor":
    parts.append(optax.scale_by_factored_rms(decay_rate=opt_cfg.decay_rate, epsilon=opt_cfg.eps))
    parts.append(optax.clip_by_block_rms(1.0))
    if b1:
      parts.append(optax.ema(b1, debias=False))
  if opt_cfg.rms_scaling or (name == "adafactor" and opt_cfg.multiply_by_parameter_scale):
    parts.append(scale_by_param_rms(opt_cfg.rms_min_scale))
  if opt_cfg.weight_decay:
    parts.append(optax.add_decayed_weights(opt_cfg.weight_decay, mask=mask))
  # Always freezable: a stage that runs a view of the model (stacking, growth) freezes the
  # parameters outside it; without ``active=`` the wrapper changes nothing.
  tx = freeze_inactive(optax.chain(*parts))
  return Optimizer(optax.with_extra_args_support(tx),
                   hessian_interval=opt_cfg.hessian_interval if name == "sophia_g" else 0,
                   hessian_grad_clip=opt_cfg.hessian_grad_clip,
                   needs_obj_fn=name == "sophia_h", freeze_inactive=opt_cfg.freeze_inactive)


__all__ = ["OPTIMIZERS", "Optimizer", "SCHEDULES", "SophiaGState", "build_optimizer",
           "check_optimizer", "decay_mask", "freeze_inactive", "gnb_hessian_estimate",
           "layer_activity", "learning_rate", "lion", "scale_by_param_rms", "scale_by_sophia_g",
           "scale_by_sophia_h", "sophia_g", "sophia_h", "sophia_metrics"]
