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
