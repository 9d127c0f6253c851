"""Progressive layer dropping (Zhang & He, 2020, "Accelerating Training of Transformer-Based
Language Models with Progressive Layer Dropping"; Algorithm 2 of No Train No Gain).

Time schedule: theta(t) = (1 - theta_bar) exp(-gamma t) + theta_bar with gamma = gamma_f / T,
t and T in the run's budget unit (steps, tokens or RST seconds), so gamma t = gamma_f x budget
fraction and the schedule decays over the budget the run actually has. Depth schedule
(Algorithm 2, lines 4-14): the keep probability starts at p = 1 for the first layer and falls by
(1 - theta(t)) / L per layer, so layer i (0-based) is kept with p_i = 1 - i (1 - theta(t)) / L.
A kept layer's attention and MLP branches are divided by p_i (``scaling="inverse_p"``, as in
Algorithm 2 and DeepSpeed) or not (``"none"``).

Defaults: theta_bar = 0.5 (Zhang & He, and NTNG), gamma_f = 100 (NTNG's BERT setting; it uses
20 for T5).

Dropped layers skip their compute: the step scans all L layers with ``lax.cond`` on a per-step
Bernoulli draw (``LayerSelection.active``), one compile for the whole run. The FLOPs metrics
and the RST charge use the expected layer count sum_i p_i at the step's budget fraction.
Evaluation runs the full model unscaled.
"""
import math

import jax
import jax.numpy as jnp

from raptr_jax.methods.base import Method
from raptr_jax.models.selection import LayerSelection, Selection
from raptr_jax.plan import Stage

SCALINGS = ("inverse_p", "none")


def check(theta_bar: float, gamma_f: float, scaling: str) -> None:
  if not 0.0 < theta_bar <= 1.0:
    raise ValueError(f"method.pld.theta_bar is the final keep level, in (0, 1]; got {theta_bar}")
  if not gamma_f > 0:
    raise ValueError(f"method.pld.gamma_f must be positive (100 for BERT, 20 for T5 in NTNG); got {gamma_f}")
  if scaling not in SCALINGS:
    raise ValueError(f"method.pld.scaling must be one of {SCALINGS}, got {scaling!r}")


def theta(fraction, theta_bar: float, gamma_f: float, exp=jnp.exp):
  """theta(t) at budget fraction t / T (Algorithm 2, line 5); ``exp=math.exp`` on the host."""
  return (1.0 - theta_bar) * exp(-gamma_f * fraction) + theta_bar


def keep_probabilities(fraction, num_layers: int, theta_bar: float, gamma_f: float):
  """[L] keep probability of each layer at budget fraction t / T (Algorithm 2, lines 4, 6, 14)."""
  decay = (1.0 - theta(fraction, theta_bar, gamma_f)) / num_layers
  return 1.0 - jnp.arange(num_layers, dtype=jnp.float32) * decay


def expected_layer_fraction(fraction, num_layers: int, theta_bar: float, gamma_f: float) -> float:
  """Expected share of layers a step runs at budget fraction t / T: mean_i p_i."""
  t = theta(fraction, theta_bar, gamma_f, exp=math.exp)  # per training step: no device round trip
  return 1.0 - (1.0 - t) * (num_layers - 1) / (2.0 * num_layers)


def make_select(num_layers: int, theta_bar: float = 0.5, gamma_f: float = 100.0,
                scaling: str = "inverse_p"):
  """``select(key, batch, progress) -> Selection``: each layer kept with its p_i."""
  check(theta_bar, gamma_f, scaling)

  def select(key, batch, progress):
    p = keep_probabilities(progress, num_layers, theta_bar, gamma_f)
    keep = jax.random.uniform(key, (num_layers,)) < p
    scales = 1.0 / p if scaling == "inverse_p" else jnp.ones_like(p)
    return Selection(layers=LayerSelection(jnp.arange(num_layers, dtype=jnp.int32),
                                           jnp.where(keep, scales, 0.0), active=keep))

  return select


def plan_stages(pld_cfg, num_layers: int):
  """One stage over the whole budget (the schedule is a function of the step's progress)."""
  c = pld_cfg
  select = make_select(num_layers, c.theta_bar, c.gamma_f, c.scaling)
  share = lambda f: expected_layer_fraction(f, num_layers, c.theta_bar, c.gamma_f)
  return (Stage(f"pld:theta_bar={c.theta_bar:g}", 1.0, ("pld", c.theta_bar, c.gamma_f, c.scaling), select,
                layer_fraction=share),)


class ProgressiveLayerDropping(Method):
  """PLD on the method interface (``method.name=pld``, options in ``method.pld``)."""
  name = "pld"

  def validate(self, cfg) -> None:
    c = cfg.method.pld
    check(c.theta_bar, c.gamma_f, c.scaling)
    if cfg.model.family == "t5" and cfg.model.num_decoder_layers not in (0, cfg.model.num_layers):
      raise ValueError("method.name=pld on t5 draws one schedule for both stacks: set "
                       f"model.num_decoder_layers=0 (= model.num_layers={cfg.model.num_layers})")

  def stages(self, cfg, model_cfg):
    return plan_stages(cfg.method.pld, model_cfg.num_layers)
