import dataclasses
import math

import numpy as np
import pytest

from raptr_jax import plan as plan_lib
from raptr_jax.optim.schedules import check_schedule, learning_rate


def lr(t, name, warmup=0.1, final=0.1, peak=2.0):
  return float(learning_rate(t, name, peak, warmup, final))


@pytest.mark.parametrize("name", ["cosine", "linear", "one_cycle", "constant", "rsqrt"])
def test_warmup_is_linear_to_peak(name):
  assert lr(0.0, name) == 0.0
  assert lr(0.05, name) == pytest.approx(1.0)
  assert lr(0.1, name) == pytest.approx(2.0)


def test_decays_end_where_they_should():
  assert lr(1.0, "cosine") == pytest.approx(0.2)
  assert lr(0.55, "cosine") == pytest.approx(0.2 + 1.8 * 0.5)      # half-way in the decay
  assert lr(1.0, "linear") == pytest.approx(0.2)
  assert lr(0.4, "rsqrt") == pytest.approx(2.0 * np.sqrt(0.1 / 0.4))
  assert lr(0.7, "constant") == pytest.approx(2.0)


def test_one_cycle_of_no_train_no_gain_peaks_at_half_the_budget():
  # BERT runs: linear 0 -> peak at 50% of the budget, linear to 0 at 100%.
  assert lr(0.5, "one_cycle", warmup=0.5, final=0.0) == pytest.approx(2.0)
  assert lr(0.25, "one_cycle", warmup=0.5, final=0.0) == pytest.approx(1.0)
  assert lr(0.75, "one_cycle", warmup=0.5, final=0.0) == pytest.approx(1.0)
  assert lr(1.0, "one_cycle", warmup=0.5, final=0.0) == pytest.approx(0.0)


@pytest.mark.parametrize("args,match", [(("sawtooth", 0.1, 0.1), "unknown schedule"),
                                        (("cosine", 1.5, 0.1), "warmup"),
                                        (("cosine", 0.1, -1.0), "final"),
                                        (("rsqrt", 0.0, 0.0), "rsqrt")])
def test_bad_schedules_are_rejected(args, match):
  with pytest.raises(ValueError, match=match):
    check_schedule(*args)


def test_plan_clock_charges_in_the_budget_unit():
  stages = (plan_lib.Stage("small", 0.25, shape=("k", 2), tokens_per_step=50),
            plan_lib.Stage("full", 1.0))
  p = plan_lib.Plan(stages, "tokens", budget=1000, tokens_per_step=100)
  assert p.stage_index(0.0) == 0 and p.stage_index(0.2499) == 0 and p.stage_index(0.25) == 1
  assert p.charge(stages[0]) == 50 and p.charge(stages[1]) == 100
  # 250 tokens at 50 per step (5 steps), then 750 at 100 per step (8 steps, the last crossing).
  assert p.total_steps() == 5 + 8
  steps = plan_lib.Plan(stages, "steps", budget=10, tokens_per_step=100)
  assert steps.charge(stages[0]) == 1 and steps.total_steps() == 10


@pytest.mark.parametrize("kwargs,match", [
    (dict(unit="hours"), "budget.unit"), (dict(budget=0), "positive"),
    (dict(ends=(0.5, 0.4, 1.0)), "increase"), (dict(ends=(0.5, 0.9)), "last stage")])
def test_bad_plans_are_rejected(kwargs, match):
  ends = kwargs.pop("ends", (0.5, 1.0))
  args = dict(unit="steps", budget=10, tokens_per_step=1) | kwargs
  with pytest.raises(ValueError, match=match):
    plan_lib.Plan(tuple(plan_lib.Stage(str(e), e) for e in ends), **args)


def test_eval_cadence_crossings():
  assert plan_lib.crossed(0.19, 0.2, 0.1)
  assert not plan_lib.crossed(0.2, 0.25, 0.1)
  assert plan_lib.crossed(0.29, 0.31, 0.1)
  assert not plan_lib.crossed(0.1, 0.2, 0.0)


def _simulated_steps(plan, hessian_interval=0):
  """The training loop's own arithmetic, one step at a time (the reference for step_count)."""
  progress, steps = 0.0, 0
  per_step = plan.scoring.passes_per_step if plan.scoring is not None else 0.0
  while progress < plan.budget:
    hessian = bool(hessian_interval) and steps % hessian_interval == hessian_interval - 1
    fraction = progress / plan.budget
    progress += plan.charge(plan.stages[plan.stage_index(fraction)], hessian, fraction)
    progress += per_step * plan.scoring_charge(1)
    steps += 1
  return steps


def _random_plan(rng, unit):
  ends = np.sort(rng.choice(np.arange(1, 20), size=rng.integers(0, 4), replace=False)) / 20
  stages = tuple(plan_lib.Stage(f"s{i}", float(e), shape=("s", i), tokens_per_step=int(rng.integers(10, 100)))
                 for i, e in enumerate(ends)) + (plan_lib.Stage("full", 1.0),)
  costs = {(st.shape, h): float(rng.uniform(0.1, 2.0)) * (2.5 if h else 1.0) for st in stages for h in (False, True)}
  scoring = plan_lib.Scoring(rows=8, passes_per_step=float(rng.uniform(1, 3)), tokens=800) if rng.random() < 0.3 else None
  costs[(("score", 8), False)] = 0.3
  budget = float(rng.uniform(5, 400)) * (100 if unit == "tokens" else 1)
  return plan_lib.Plan(stages, unit, budget, tokens_per_step=100, step_costs=costs, scoring=scoring)


@pytest.mark.parametrize("unit", ["steps", "tokens", "rst_seconds"])
def test_closed_form_step_count_equals_the_loop(unit):
  rng = np.random.default_rng(["steps", "tokens", "rst_seconds"].index(unit))
  for _ in range(60):
    plan = _random_plan(rng, unit)
    for h in (0, 1, 3, 10):
      steps, exact = plan.step_count(h)
      if unit == "rst_seconds" or (plan.scoring is not None and unit != "steps"):  # fractional: within a step
        assert abs(steps - _simulated_steps(plan, h)) <= 1 and not exact, (plan, h)
      else:
        assert (steps, exact) == (_simulated_steps(plan, h), True), (plan, h)


def test_huge_budgets_plan_in_a_few_charges_and_varying_stages_are_estimated(monkeypatch):
  calls = []
  charge = plan_lib.Plan.charge
  monkeypatch.setattr(plan_lib.Plan, "charge", lambda self, *a: calls.append(1) or charge(self, *a))
  stages = (plan_lib.Stage("half", 0.3, shape=("k", 1), tokens_per_step=1024), plan_lib.Stage("full", 1.0))
  tokens = plan_lib.Plan(stages, "tokens", budget=1e12, tokens_per_step=2048)
  # 3e11 tokens at 1024 a step, then 7e11 at 2048 (the last step crosses the budget).
  assert tokens.step_count() == (math.ceil(3e11 / 1024) + math.ceil(7e11 / 2048), True)
  costs = {(st.shape, h): (0.5 if st.name == "half" else 1.0) * (3 if h else 1) for st in stages for h in (False, True)}
  rst = plan_lib.Plan(stages, "rst_seconds", budget=1e7, tokens_per_step=1, step_costs=costs)
  # A Hessian step every 10 costs 3x: 12 s per 10 steps in the full stage, 6 s in the half one.
  assert rst.step_count(10)[0] == pytest.approx(3e6 / 0.6 + 7e6 / 1.2, abs=2)
  assert len(calls) < 500
  # Progressive layer dropping on the RST clock: the charge depends on the budget fraction.
  pld = (plan_lib.Stage("pld", 1.0, layer_fraction=lambda f: 1.0 - 0.5 * f),)
  small = plan_lib.Plan(pld, "rst_seconds", budget=100.0, tokens_per_step=1,
                        step_costs={(("full",), False): 1.0}, layer_cost_share=0.8)
  assert small.step_count() == (_simulated_steps(small), True)  # stepped exactly below 20k steps
  huge = dataclasses.replace(small, budget=1e9)
  calls.clear()
  steps, exact = huge.step_count()
  # charge(f) = 1 - 0.4 f: steps = 1e9 * integral of 1 / (1 - 0.4 f) over [0, 1] = -1e9 ln(0.6) / 0.4
  assert not exact and steps == pytest.approx(-1e9 * math.log(0.6) / 0.4, rel=1e-4)
  assert len(calls) < plan_lib.EXACT_VARYING_STEPS + 1000


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0])
def test_non_finite_budgets_are_rejected(value):
  from raptr_jax import config as config_lib
  cfg = config_lib.base_config()
  cfg.budget.value = value
  with pytest.raises(ValueError, match="budget.value must be a positive, finite number"):
    config_lib.validate(cfg)
  with pytest.raises(ValueError, match="positive and finite"):
    plan_lib.baseline_plan("tokens", value, 1)
