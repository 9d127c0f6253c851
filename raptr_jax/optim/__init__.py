"""Optimizers as optax transforms, plus the run's learning-rate schedules.

``build_optimizer(cfg)`` returns the *direction* transform (clipping, moments, weight decay);
the train step multiplies its output by ``-lr(progress)``, where ``progress`` is the fraction of
the run's budget in the budget's own unit (steps, tokens, RST seconds). That one clock is what
keeps schedules honest across methods whose steps cost different amounts (No Train No Gain).
"""
import jax
import jax.numpy as jnp
import optax

from raptr_jax.optim.schedules import SCHEDULES, learning_rate

OPTIMIZERS = ("adamw", "adafactor")


def decay_mask(params, axes_tree):
  """Weight decay on matrices and embeddings, not on norm scales."""
  return jax.tree.map(lambda p, a: "norm" not in a, params, axes_tree,
                      is_leaf=lambda x: isinstance(x, tuple))


def build_optimizer(opt_cfg, mask=None) -> optax.GradientTransformation:
  name = opt_cfg.name
  parts = []
  if opt_cfg.grad_clip and opt_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip))
  if name == "adamw":
    mu_dtype = jnp.dtype(opt_cfg.mu_dtype) if opt_cfg.mu_dtype else None
    parts.append(optax.scale_by_adam(b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps, mu_dtype=mu_dtype))
  elif name == "adafactor":
    parts.append(optax.scale_by_factored_rms(decay_rate=opt_cfg.decay_rate, epsilon=opt_cfg.eps))
    parts.append(optax.clip_by_block_rms(1.0))
    if opt_cfg.b1:
      parts.append(optax.ema(opt_cfg.b1, debias=False))
    if opt_cfg.multiply_by_parameter_scale:
      parts.append(optax.scale_by_param_block_rms())
  else:
    raise ValueError(f"unknown optimizer.name {name!r}; available: {OPTIMIZERS}")
  if opt_cfg.weight_decay:
    parts.append(optax.add_decayed_weights(opt_cfg.weight_decay, mask=mask))
  return optax.chain(*parts)


__all__ = ["OPTIMIZERS", "SCHEDULES", "build_optimizer", "decay_mask", "learning_rate"]
