import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from raptr_jax import config as config_lib
from raptr_jax import train as train_lib
from raptr_jax.config import base_config
from raptr_jax.metrics import read_metrics
from raptr_jax.optim import (build_optimizer, gnb_hessian_estimate, layer_activity, lion,
                             scale_by_param_rms, scale_by_sophia_g)
from raptr_jax.optim.presets import apply_paper_optimizer


def official_sophia_g(params, grads, estimates, lr, wd, b1, b2, rho, bs):
  """float64 NumPy transcription of the official SophiaG step + update_hessian.

  ``estimates[t]`` is the squared clipped gradient of the sampled-label loss (what the official
  ``update_hessian`` receives), or None on steps without a Hessian pass.
  """
  p, m, h = params.astype(np.float64), np.zeros_like(params, np.float64), np.zeros_like(params, np.float64)
  out = []
  for g, e in zip(grads, estimates):
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    ratio = np.minimum(np.abs(m) / (rho * bs * h + 1e-15), 1.0)
    p = p - lr * np.sign(m) * ratio
    if e is not None:
      h = b2 * h + (1 - b2) * e
    out.append(p.copy())
  return out


def optax_param_sophia(params, grads, estimates, lr, wd, b1, b2, gamma, eps):
  p, m, h = params.astype(np.float64), np.zeros_like(params, np.float64), np.zeros_like(params, np.float64)
  out = []
  for t, (g, e) in enumerate(zip(grads, estimates), start=1):
    m = b1 * m + (1 - b1) * g
    u = np.clip((m / (1 - b1 ** t)) / np.maximum(gamma * h, eps), -1, 1)
    p = p - lr * (u + wd * p)
    if e is not None:
      h = b2 * h + (1 - b2) * e
    out.append(p.copy())
  return out


def _run_ours(tx, params, grads, estimates, lr, scale_estimate):
  p, out = jnp.asarray(params, jnp.float32), []
  state = tx.init(p)
  for g, e in zip(grads, estimates):
    extra = {} if e is None else {"hessian_estimate": jnp.asarray(scale_estimate * e, jnp.float32)}
    u, state = tx.update(jnp.asarray(g, jnp.float32), state, p, **extra)
    p = p - lr * u
    out.append(np.asarray(p))
  return out


@pytest.fixture
def trajectory():
  rng = np.random.default_rng(0)
  params = rng.normal(size=(5, 7))
  grads = [rng.normal(size=(5, 7)) * 0.1 for _ in range(12)]
  estimates = [rng.uniform(0, 0.01, size=(5, 7)) if t % 4 == 3 else None for t in range(12)]
  return params, grads, estimates


def test_sophia_g_official_matches_numpy_reference(trajectory):
  params, grads, estimates = trajectory
  lr, wd, b1, b2, rho, bs = 0.01, 0.2, 0.965, 0.99, 0.05, 480
  want = official_sophia_g(params, grads, estimates, lr, wd, b1, b2, rho, bs)
  tx = optax.chain(scale_by_sophia_g(b1=b1, b2=b2, rho=rho), optax.add_decayed_weights(wd))
  got = _run_ours(tx, params, grads, estimates, lr, scale_estimate=bs)  # GNB scales by B = bs
  for w, g in zip(want, got):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6)
  assert not np.allclose(want[3], want[-1])  # the Hessian steps changed the trajectory


def test_sophia_g_optax_parameterisation_matches_numpy_reference(trajectory):
  params, grads, estimates = trajectory
  lr, wd, b1, b2, gamma, eps = 0.01, 0.1, 0.965, 0.99, 0.5, 1e-8
  want = optax_param_sophia(params, grads, estimates, lr, wd, b1, b2, gamma, eps)
  tx = optax.chain(scale_by_sophia_g(b1=b1, b2=b2, gamma=gamma, eps=eps, parameterization="optax"),
                   optax.add_decayed_weights(wd))
  got = _run_ours(tx, params, grads, estimates, lr, scale_estimate=1.0)
  for w, g in zip(want, got):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6)


def test_gnb_estimate_is_unbiased_for_the_gauss_newton_diagonal():
  """Monte Carlo over sampled labels: mean of B g_hat^2 -> diag(J^T (diag p - p p^T) J) / B."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)                 # 6 positions, 4 features
  w = jnp.asarray(rng.normal(size=(4, 5)) * 0.5, jnp.float32)          # 5 classes
  weights = jnp.asarray([1, 1, 0, 1, 1, 1], jnp.float32)                # one position not predicted
  logits_fn = lambda p: x @ p
  keys = jax.random.split(jax.random.key(0), 20000)
  est = jax.vmap(lambda k: gnb_hessian_estimate(logits_fn, w, k, weights, clip_norm=None))(keys).mean(0)
  # Exact GN diagonal of the mean loss over the predicted positions.
  n = weights.sum()
  probs = jax.nn.softmax(x @ w)
  gn = jnp.zeros_like(w)
  for i in range(6):
    h = jnp.diag(probs[i]) - jnp.outer(probs[i], probs[i])              # d2 loss / d logits2
    jac = jax.jacobian(lambda p: x[i] @ p)(w).reshape(5, 20)             # d logits / d w
    gn_i = jnp.diag(jac.T @ h @ jac).reshape(4, 5)
    gn = gn + weights[i] * gn_i / n
  np.testing.assert_allclose(est, gn, rtol=0.06, atol=2e-4)


def test_complete_sophia_g_is_the_direction_with_decay_and_lr(trajectory):
  from raptr_jax.optim import sophia_g, sophia_h
  params, grads, estimates = trajectory
  want = official_sophia_g(params, grads, estimates, 0.01, 0.2, 0.965, 0.99, 0.05, 480)
  tx = sophia_g(0.01, rho=0.05, weight_decay=0.2)
  p, state = jnp.asarray(params, jnp.float32), None
  state = tx.init(p)
  for g, e, w in zip(grads, estimates, want):
    extra = {} if e is None else {"hessian_estimate": jnp.asarray(480 * e, jnp.float32)}
    u, state = tx.update(jnp.asarray(g, jnp.float32), state, p, **extra)
    p = optax.apply_updates(p, u)
    np.testing.assert_allclose(p, w, rtol=2e-5, atol=1e-6)
  tx = sophia_h(0.01)  # same interface; Hutchinson needs the objective
  obj = lambda q: jnp.sum(q ** 2)
  u, _ = tx.update(jnp.asarray(grads[0], jnp.float32), tx.init(p), p, obj_fn=obj)
  assert u.shape == p.shape and np.all(np.isfinite(u))


def test_param_rms_scaling_matches_its_definition():
  params = {"a": jnp.full((4, 4), 3.0), "b": jnp.full((3,), 1e-5)}
  updates = {"a": jnp.ones((4, 4)), "b": jnp.ones((3,))}
  out, _ = scale_by_param_rms(1e-3).update(updates, scale_by_param_rms(1e-3).init(params), params)
  np.testing.assert_allclose(out["a"], 3.0)      # RMS(a) = 3
  np.testing.assert_allclose(out["b"], 1e-3)     # floored at min_scale


def test_lion_is_optax_and_our_chain_reproduces_it():
  assert lion is optax.lion
  cfg = base_config().optimizer
  cfg.update(name="lion", weight_decay=0.1, grad_clip=0.0)
  ours = build_optimizer(cfg).tx
  ref = optax.lion(learning_rate=3e-4, b1=0.9, b2=0.99, weight_decay=0.1)
  params = {"w": jnp.linspace(-1, 1, 12).reshape(3, 4)}
  s_ours, s_ref = ours.init(params), ref.init(params)
  for t in range(3):
    g = {"w": jnp.sin(params["w"] * (t + 1))}
    u, s_ours = ours.update(g, s_ours, params)
    r, s_ref = ref.update(g, s_ref, params)
    np.testing.assert_allclose(-3e-4 * u["w"], r["w"], rtol=1e-6)


def test_frozen_parameters_are_bitwise_unchanged_and_their_state_untouched():
  cfg = base_config().optimizer
  cfg.update(name="adamw", freeze_inactive=True, weight_decay=0.1)
  tx = build_optimizer(cfg).tx
  params = {"layers": {"w": jnp.ones((4, 3, 3))}, "embedding": jnp.ones((5, 3))}
  state = tx.init(params)
  g = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  u, new_state = tx.update(g, state, params, active=layer_activity(params, jnp.array([0, 2]), 4))
  new = jax.tree.map(lambda p, d: p - 1e-2 * d, params, u)
  w_old, w_new = np.asarray(params["layers"]["w"]), np.asarray(new["layers"]["w"])
  assert np.array_equal(w_new[[1, 3]], w_old[[1, 3]])            # frozen: bitwise the same
  assert not np.allclose(w_new[[0, 2]], w_old[[0, 2]])
  assert not np.allclose(new["embedding"], params["embedding"])  # non-stacked params always active
  stacked = [(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new_state))
             if np.shape(a) == (4, 3, 3)]
  assert len(stacked) == 2                                         # Adam's mu and nu
  for before, after in stacked:
    assert np.array_equal(before[[1, 3]], after[[1, 3]]) and not np.array_equal(before[[0, 2]], after[[0, 2]])
  counts = [(a, b) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)) if np.ndim(a) == 0]
  assert all(int(b) == int(a) + 1 for a, b in counts)              # step counters still advance


def test_bf16_moments_when_asked():
  cfg = base_config().optimizer
  cfg.update(name="adamw", mu_dtype="bfloat16")
  state = build_optimizer(cfg).tx.init({"w": jnp.ones((2, 2))})
  dtypes = {np.asarray(x).dtype for x in jax.tree.leaves(state) if np.ndim(x) == 2}
  assert np.dtype(jnp.bfloat16) in dtypes


@pytest.mark.parametrize("field,value,match", [("name", "adagrad", "unknown optimizer.name"),
                                               ("rho", 0.0, "rho must be > 0"),
                                               ("hessian_interval", 0, "hessian_interval")])
def test_bad_optimizer_settings_are_config_errors(field, value, match):
  cfg = base_config()
  cfg.optimizer.name = "sophia_g"
  cfg.optimizer[field] = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate(cfg)


def test_paper_presets():
  cfg = apply_paper_optimizer(base_config(), "bert", "sophia_g")
  assert (cfg.schedule.peak, cfg.optimizer.weight_decay, cfg.optimizer.rho) == (4e-4, 0.015, 0.01)
  cfg = apply_paper_optimizer(base_config(), "t5", "lion")
  assert (cfg.schedule.peak, cfg.optimizer.weight_decay, cfg.optimizer.rms_scaling) == (7.5e-4, 0.0, True)
  with pytest.raises(ValueError, match="no paper optimizer preset"):
    apply_paper_optimizer(base_config(), "gpt", "lion")


@pytest.mark.parametrize("name", ["adamw", "lion", "sophia_g", "sophia_h", "adafactor"])
def test_each_optimizer_trains_the_tiny_model(name, tiny_config, tmp_path):
  cfg = tiny_config
  cfg.budget.value, cfg.eval.every, cfg.log.every = 24, 1.0, 1
  cfg.optimizer.update(name=name, hessian_interval=4)
  cfg.schedule.peak = 1e-2 if name == "adafactor" else 3e-3
  train_lib.train(cfg, str(tmp_path))
  rows = read_metrics(tmp_path)
  assert rows[-1]["eval/loss"] < rows[0]["eval/loss"] - 1.0, name
  if name == "sophia_g":  # h stays 0 until the first Hessian pass (after step 4), then is refreshed
    norms = [r["sophia/hessian_norm"] for r in rows[1:]]
    assert norms[:3] == [0.0, 0.0, 0.0] and norms[3] > 0 and math.isfinite(norms[-1])
    assert 0.0 <= rows[-1]["sophia/win_rate"] <= 1.0


@pytest.mark.parametrize("freeze", [True, False])
def test_train_step_freezes_unselected_layers_only_when_asked(freeze, tiny_config):
  from raptr_jax import plan as plan_lib
  from raptr_jax.data import pipeline
  from raptr_jax.models import LayerSelection, Selection
  cfg = tiny_config
  cfg.optimizer.update(name="adamw", freeze_inactive=freeze, weight_decay=0.1)
  run = train_lib.setup(cfg)
  assert run.steps.ctx.optimizer.freeze_inactive == freeze
  stage = plan_lib.Stage("top", 1.0, shape=("top",),
                         select=lambda key, batch, progress: Selection(layers=LayerSelection(jnp.array([1]), jnp.ones(1))))
  stream = pipeline.build_stream(cfg.data, "train", cfg.data.batch_size, 0, train=True)
  state = run.init()
  before = jax.device_get(state.params)["layers"]
  for i in range(2):
    batch = run.device_batch(stream.next_batch())
    state, _ = run.steps.train_step(stage)(state, batch, jax.random.key(i), jnp.float32(0.5))
  after = jax.device_get(state.params)["layers"]
  for name in after:
    assert not np.array_equal(after[name][1], before[name][1]), name
    assert np.array_equal(after[name][0], before[name][0]) == freeze or name.endswith("norm"), name
