"""Sophia (Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for Language
Model Pre-training"), as used by No Train No Gain (Algorithm 5, Appendix C.6).

* ``scale_by_sophia_g``: the clipped, Hessian-preconditioned sign update.
    m <- b1 m + (1 - b1) g
    official:  u = sign(m) * min(|m| / (rho * h + 1e-15), 1)     (no bias correction)
    optax:     u = clip(m_hat / max(gamma * h, eps), -1, 1),  m_hat = m / (1 - b1^t)
  ``h`` is an EMA (decay b2, starting at 0) of diagonal Hessian estimates passed in as the extra
  argument ``hessian_estimate`` on the steps that compute one (every k = 10 steps in the official
  code); on other steps ``h`` is unchanged. As in the official code, the step that brings an
  estimate is taken with the previous ``h`` and the estimate refreshes it afterwards, so the first
  k steps are sign steps. Decoupled weight decay and the learning rate are applied by the chain
  around it (``add_decayed_weights`` then ``-lr``), which is the official
  ``p *= 1 - lr * wd; p -= lr * u``.
* ``gnb_hessian_estimate``: the Gauss-Newton-Bartlett estimator: labels sampled from the model's
  own predicted distribution at the predicted positions, ``g_hat`` the gradient of the mean
  cross-entropy on those labels (optionally clipped by global norm, 1.0 officially), estimate
  ``B * g_hat * g_hat`` with B the number of predicted tokens. Its expectation is the diagonal of
  the Gauss-Newton matrix of the mean loss. The official code stores ``g_hat^2`` and divides by
  ``rho * bs * h`` with bs = tokens per step: identical to ``rho * h`` here when the Hessian batch
  has bs tokens.
* ``sophia_g`` / ``sophia_h``: complete optimizers (direction + decoupled weight decay + LR) in
  optax's style; ``sophia_h`` is Sophia with Hutchinson's estimator, ``optax.contrib.sophia``
  (its ``obj_fn`` extra argument), offered with the same knobs.

Defaults: official GPT-2 small b1=0.965, b2=0.99, rho=0.05, k=10, wd 0.2; No Train No Gain
BERT lr 4e-4, wd 0.015, rho 0.01 (bf16); T5 lr 1e-3, rho 0.01, with RMS-scaled LR.
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PARAMETERIZATIONS = ("official", "optax")


class SophiaGState(NamedTuple):
  count: jax.Array       # steps taken
  mu: Any                # EMA of gradients
  hessian: Any           # EMA of diagonal Hessian estimates
  win_rate: jax.Array    # fraction of coordinates whose update was not clipped (last step)


def scale_by_sophia_g(b1: float = 0.965, b2: float = 0.99, rho: float = 0.05,
                      parameterization: str = "official", gamma: float = 0.01, eps: float = 1e-8,
                      mu_dtype=None) -> optax.GradientTransformationExtraArgs:
  """Sophia-G's update direction; pass ``hessian_estimate=`` on the steps that have one."""
  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(f"Sophia parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
  if parameterization == "official" and not rho > 0:
    raise ValueError(f"Sophia rho must be > 0, got {rho}")
  if parameterization == "optax" and not gamma > 0:
    raise ValueError(f"Sophia gamma must be > 0, got {gamma}")

  def init_fn(params):
    zeros = lambda dtype: jax.tree.map(lambda p: jnp.zeros_like(p, dtype=dtype or p.dtype), params)
    return SophiaGState(jnp.zeros([], jnp.int32), zeros(mu_dtype), zeros(None), jnp.zeros([], jnp.float32))

  def update_fn(updates, state, params=None, *, hessian_estimate=None, **unused_extra):
    del params
    count = optax.safe_int32_increment(state.count)
    mu = jax.tree.map(lambda m, g: (b1 * m + (1 - b1) * g).astype(m.dtype), state.mu, updates)
    if parameterization == "official":
      ratio = jax.tree.map(lambda m, h: jnp.abs(m) / (rho * h + 1e-15), mu, state.hessian)
      direction = jax.tree.map(lambda m, r: jnp.sign(m) * jnp.minimum(r, 1.0), mu, ratio)
    else:
      correction = 1.0 - b1 ** count.astype(jnp.float32)
      ratio = jax.tree.map(lambda m, h: (m / correction) / jnp.maximum(gamma * h, eps), mu, state.hessian)
      direction = jax.tree.map(lambda r: jnp.clip(r, -1.0, 1.0), ratio)
    unclipped = sum(jnp.sum(jnp.abs(r) < 1.0) for r in jax.tree.leaves(ratio))
    win_rate = unclipped / max(1, sum(r.size for r in jax.tree.leaves(ratio)))
    hessian = state.hessian
    if hessian_estimate is not None:
      hessian = jax.tree.map(lambda h, e: b2 * h + (1 - b2) * e.astype(h.dtype), hessian, hessian_estimate)
    direction = jax.tree.map(lambda d, g: d.astype(g.dtype), direction, updates)
    return direction, SophiaGState(count, mu, hessian, win_rate.astype(jnp.float32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gnb_hessian_estimate(logits_fn, params, key, weights, clip_norm: float | None = 1.0):
  """Gauss-Newton-Bartlett diagonal Hessian estimate at ``params``.

  ``logits_fn(params) -> logits [..., V]``; ``weights [...]`` marks the predicted positions (1)
  and the rest (0): labels are sampled and the loss taken only there (MLM: masked positions).
  Costs one forward and one backward pass (the loss gradient w.r.t. the logits is analytic).
  """
  logits, vjp = jax.vjp(logits_fn, params)
  logits32 = jax.lax.stop_gradient(logits).astype(jnp.float32)
  labels = jax.random.categorical(key, logits32)
  n = jnp.maximum(jnp.sum(weights), 1.0)
  probs = jax.nn.softmax(logits32, axis=-1)
  dlogits = (probs - jax.nn.one_hot(labels, logits.shape[-1])) * (weights / n)[..., None]
  (grad,) = vjp(dlogits.astype(logits.dtype))
  if clip_norm:
    grad, _ = optax.clip_by_global_norm(clip_norm).update(grad, optax.EmptyState())
  return jax.tree.map(lambda g: n * jnp.square(g.astype(jnp.float32)), grad)


def sophia_g(learning_rate, b1: float = 0.965, b2: float = 0.99, rho: float = 0.05,
             weight_decay: float = 0.2, parameterization: str = "official", gamma: float = 0.01,
             eps: float = 1e-8, mu_dtype=None, weight_decay_mask=None):
  """Sophia-G as a complete optax optimizer (direction, decoupled weight decay, learning rate).

  Call ``update(grads, state, params, hessian_estimate=gnb_hessian_estimate(...))`` every k steps
  and without it otherwise.
  """
  return optax.chain(
      scale_by_sophia_g(b1, b2, rho, parameterization, gamma, eps, mu_dtype),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate))


def sophia_h(learning_rate, b1: float = 0.965, b2: float = 0.99, gamma: float = 0.01,
             weight_decay: float = 0.2, eps: float = 1e-8, update_interval: int = 10, seed: int = 0,
             weight_decay_mask=None):
  """Sophia-H (Hutchinson estimator) with the same interface as ``sophia_g``; it is
  ``optax.contrib.sophia``, whose ``update`` needs ``obj_fn=lambda params: loss``."""
  return optax.chain(
      scale_by_sophia_h(b1, b2, gamma, eps, update_interval, seed),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate))


def scale_by_sophia_h(b1: float = 0.965, b2: float = 0.99, gamma: float = 0.01, eps: float = 1e-8,
                      update_interval: int = 10, seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """Sophia-H direction (Hutchinson estimator): ``optax.contrib.sophia`` without its learning
  rate and weight decay (the surrounding chain applies those, as for every optimizer here).

  Its ``update`` needs ``obj_fn=lambda params: loss`` as an extra argument; it refreshes its
  Hessian estimate every ``update_interval`` steps inside the step (``lax.cond``).
  """
  from optax import contrib  # pylint: disable=g-import-not-at-top
  inner = contrib.sophia(
      learning_rate=1.0, b1=b1, b2=b2, eps=eps, weight_decay=0.0, gamma=gamma, clip_threshold=1.0,
      update_interval=update_interval,
      hessian_diagonal_fn=contrib.hutchinson_estimator_diag_hessian(jax.random.key(seed)))
  return optax.chain(inner, optax.scale(-1.0))  # undo sophia's descent sign: a direction


def sophia_metrics(opt_state) -> dict:
  """Win rate and Hessian-EMA norm of the Sophia-G state inside an optimizer state, if any."""
  states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SophiaGState))
            if isinstance(s, SophiaGState)]
  if not states:
    return {}
  return {"sophia/win_rate": states[0].win_rate, "sophia/hessian_norm": optax.global_norm(states[0].hessian)}
