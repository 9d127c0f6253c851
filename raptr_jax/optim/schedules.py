"""Learning-rate schedules as functions of the budget fraction ``t`` in [0, 1].

All schedules warm up linearly from 0 to ``peak`` over ``warmup`` (a fraction of the budget),
then:
* ``cosine``: cosine decay to ``final * peak`` at t = 1 (T5 runs of No Train No Gain: final
  1e-5 / peak).
* ``linear``: linear decay to ``final * peak``.
* ``one_cycle``: linear up to ``peak`` at ``warmup`` then linear down to ``final * peak`` (BERT
  runs of No Train No Gain: warmup 0.5, final 0).
* ``constant``: ``peak`` after warmup.
* ``rsqrt``: ``peak * sqrt(warmup / t)`` after warmup (T5's inverse square root).
"""
import jax.numpy as jnp

SCHEDULES = ("cosine", "linear", "one_cycle", "constant", "rsqrt")


def check_schedule(name: str, warmup: float, final: float) -> None:
  if name not in SCHEDULES:
    raise ValueError(f"unknown schedule.name {name!r}; available: {SCHEDULES}")
  if not 0.0 <= warmup < 1.0:
    raise ValueError(f"schedule.warmup is a fraction of the budget in [0, 1), got {warmup}")
  if not 0.0 <= final <= 1.0:
    raise ValueError(f"schedule.final is a fraction of the peak in [0, 1], got {final}")
  if name == "rsqrt" and warmup <= 0:
    raise ValueError("the rsqrt schedule needs schedule.warmup > 0")


def learning_rate(t, name: str, peak: float, warmup: float, final: float = 0.0, decay_start: float = 0.0):
  """LR at budget fraction t (a traced scalar is fine).

  ``decay_start`` > warmup holds the LR at ``peak`` from the end of warmup until then and runs
  the schedule's decay over [decay_start, 1] only (RaPTr's stagewise schedule: constant across
  stages, decay in the final full-model stage)."""
  t = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, 1.0)
  up = peak * t / warmup if warmup > 0 else jnp.asarray(peak, jnp.float32)
  start = max(warmup, decay_start)
  s = jnp.clip((t - start) / max(1.0 - start, 1e-12), 0.0, 1.0)  # progress through the decay
  low = final * peak
  if name == "cosine":
    down = low + (peak - low) * 0.5 * (1.0 + jnp.cos(jnp.pi * s))
  elif name in ("linear", "one_cycle"):
    down = peak + (low - peak) * s
  elif name == "constant":
    down = jnp.asarray(peak, jnp.float32)
  elif name == "rsqrt":
    down = peak * jnp.sqrt(warmup / jnp.maximum(t, warmup))
  else:
    raise ValueError(f"unknown schedule {name!r}; available: {SCHEDULES}")
  return jnp.where(t < warmup, up, down)
