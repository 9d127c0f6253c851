"""A run is a plan: an ordered list of stages over one progress clock.

* The **clock** counts progress in the budget's unit: ``steps`` (1 per step), ``tokens``
  (batch x sequence length per step: every position the model is fed, padding included),
  ``layer_tokens`` (random-LTD's LayerToken: the sum over the layers a step runs of the tokens
  each saw, ``flops.StageFlops.layer_tokens``; full training charges tokens x layers) or
  ``rst_seconds`` (reference system time, No Train No Gain: each step is charged what its step
  kind took on the reference system, from a calibration table, see ``rst.py``). Each stage says
  what one of its steps costs, so methods whose steps differ in cost are charged honestly. The budget fraction ``progress / budget`` drives the LR schedule, stage boundaries
  and eval cadence.
* Batch selection (selective backprop, RHO loss) also runs forward-only **scoring passes**
  (``Scoring``) between train steps; ``scoring_charge`` charges them on the same clock.
* A **stage** ends at a budget fraction and has a static ``shape`` key: steps are compiled once
  per distinct key. ``select(key, batch, progress)`` (or None for the full model) builds the
  stage's ``Selection`` inside the jitted step from the step's PRNG key and budget fraction.
  ``view`` (model fields, e.g. ``{"num_layers": 4}``) makes the stage run a smaller model whose
  parameters are the leading slices of the full ones (stacking and growth: a depth-4 step
  costs a depth-4 model); the parameters outside the view are neither used nor updated.
  ``eval_select(progress)`` is the deterministic selection evaluation runs with (growth masks);
  None: evaluation runs the stage's model unselected.
* A stage whose expected layer count changes over the budget (progressive layer dropping)
  gives ``layer_fraction(budget fraction)``, the expected share of layers a step runs. It
  drives the FLOPs metrics and, on the RST clock, the charge: the stage is calibrated with every
  layer running (at budget fraction 0), and a step is charged that time with its layer share
  (``Plan.layer_cost_share``, from the analytic FLOPs) scaled by ``layer_fraction``.
"""
import dataclasses
import math
from typing import Callable, Hashable

UNITS = ("steps", "tokens", "layer_tokens", "rst_seconds")


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  end: float                              # budget fraction at which the stage ends
  shape: Hashable = ("full",)             # compile-cache key of the stage's step
  select: Callable | None = None          # (key, batch) -> Selection | None, traced in the step
  active_layers: float | None = None      # for FLOPs accounting (None: all; may be an expectation)
  tokens_per_step: int | None = None      # charge for the tokens clock (None: batch x seq_len)
  layer_fraction: Callable | None = None  # budget fraction -> expected share of layers run
  width: dict | None = None               # model fields a step effectively has, e.g. {"num_heads": 6}
  view: dict | None = None                # model fields of the smaller model this stage runs
  eval_select: Callable | None = None     # progress -> Selection | None for evaluation
  token_drop: dict | None = None          # {stack: (kept tokens per row, layers keeping them)}
  layer_passes: float | None = None       # forward-equivalent passes of a layer per step (None: 3,
                                          # forward + backward; interlocking's routing differs)

  def model_fields(self) -> dict:
    """Model fields a step of this stage effectively has (for FLOPs and metrics)."""
    return {**(self.view or {}), **(self.width or {})}


@dataclasses.dataclass(frozen=True)
class Scoring:
  """The forward-only scoring passes of a batch-selection method (``Method.scoring``)."""
  rows: int                   # candidate rows one pass scores
  passes_per_step: float      # expected passes per train step (step estimates only)
  tokens: int = 0             # tokens one pass feeds the model (rows x seq_len; run.build_plan)
  layer_tokens: float = 0.0   # layer-tokens of one pass (full model; run.setup)

  @property
  def shape(self):
    """The RST step kind of a pass."""
    return ("score", self.rows)


@dataclasses.dataclass(frozen=True)
class Plan:
  stages: tuple[Stage, ...]
  unit: str
  budget: float
  tokens_per_step: int
  step_costs: dict | None = None          # rst_seconds: {(stage.shape, hessian): seconds}
  layer_cost_share: float = 1.0           # share of a full step's FLOPs spent in the layers
  layer_tokens: Callable | None = None    # (stage, fraction) -> layer-tokens of one step
  scoring: Scoring | None = None          # batch selection's forward-only scoring passes
  free_scoring: bool = False              # budget.free_scoring: passes charge nothing

  def __post_init__(self):
    if self.unit not in UNITS:
      raise ValueError(f"budget.unit must be one of {UNITS}, got {self.unit!r}")
    if not (self.budget > 0 and math.isfinite(self.budget)):
      raise ValueError(f"budget.value must be positive and finite, got {self.budget}")
    if not self.stages:
      raise ValueError("a plan needs at least one stage")
    ends = [s.end for s in self.stages]
    # The first stage may end at 0: it runs no step (the model a pretrained source gives, grown
    # before step 1: method.growth.grow_at=(0.0,)).
    if any(b <= a for a, b in zip(ends, ends[1:])) or ends[0] < 0:
      raise ValueError(f"stage ends must increase within [0, 1], got {ends}")
    if abs(ends[-1] - 1.0) > 1e-9:
      raise ValueError(f"the last stage must end at the budget (1.0), got {ends[-1]}")

  def stage_index(self, fraction: float) -> int:
    for i, stage in enumerate(self.stages):
      if fraction < stage.end - 1e-12:
        return i
    return len(self.stages) - 1

  def charge(self, stage: Stage, hessian: bool = False, fraction: float = 0.0) -> float:
    """Progress one step of ``stage`` started at budget ``fraction`` adds, in the budget's unit
    (``hessian``: a step that also runs Sophia-G's Hessian pass)."""
    if self.unit == "steps":
      return 1.0
    if self.unit == "tokens":
      return float(stage.tokens_per_step or self.tokens_per_step)
    if self.unit == "layer_tokens":
      if self.layer_tokens is None:
        raise ValueError("a plan on the layer_tokens clock needs its layer-token counts "
                         "(Plan.layer_tokens; run.setup attaches flops.StageFlops.layer_tokens)")
      return float(self.layer_tokens(stage, fraction))
    seconds = float(self.step_costs[(stage.shape, hessian)])
    if stage.layer_fraction is not None:  # calibrated with every layer running
      seconds *= 1.0 - self.layer_cost_share * (1.0 - stage.layer_fraction(fraction))
    return seconds

  def scoring_charge(self, passes: int) -> float:
    """Progress ``passes`` forward-only scoring passes add: their RST time, their tokens (and
    layer-tokens) fed; nothing on the steps clock or with ``free_scoring`` (NTNG Section 5.4)."""
    if not passes or self.scoring is None or self.free_scoring or self.unit == "steps":
      return 0.0
    if self.unit == "tokens":
      return float(passes * self.scoring.tokens)
    if self.unit == "layer_tokens":
      return float(passes * self.scoring.layer_tokens)
    return float(passes * self.step_costs[(self.scoring.shape, False)])

  def total_steps(self, hessian_interval: int = 0) -> int:
    """Steps the plan will run (``step_count``'s count)."""
    return self.step_count(hessian_interval)[0]

  def step_count(self, hessian_interval: int = 0) -> tuple[int, bool]:
    """(steps the plan will run, exact): each stage's steps until its end fraction is reached,
    batch selection's scoring passes at their expected rate (``Scoring.passes_per_step``).

    Closed form, so planning costs the same for 10 steps and 10^12 tokens: a stage whose steps
    all cost the same takes ceil(remaining / cost) steps (with Sophia-G's Hessian steps, whole
    periods of ``hessian_interval`` steps at once). A stage whose charge varies with the budget
    fraction (progressive layer dropping on the RST or layer-token clock) is stepped one step
    at a time for up to ``EXACT_VARYING_STEPS`` steps and the rest is estimated from the
    integral of 1 / charge over its fractions. ``exact`` is True when the count is the loop's
    to the step: whole-number charges (steps, tokens) and no estimate; with fractional charges
    (RST seconds, scoring passes at their expected rate) it may be one step off."""
    h = int(hessian_interval or 0)
    extra = self.scoring.passes_per_step * self.scoring_charge(1) if self.scoring is not None else 0.0
    progress, steps, exact = 0.0, 0, True
    last = len(self.stages) - 1
    for i, stage in enumerate(self.stages):
      # The loop runs stage i while progress / budget < end - 1e-12 (``stage_index``); the last
      # stage while progress < budget.
      if i == last:
        below = lambda p: p < self.budget
        target = self.budget
      else:
        end = stage.end - 1e-12
        below = lambda p, end=end: p / self.budget < end
        target = end * self.budget
      cost = lambda hessian, p, stage=stage: self.charge(stage, hessian, p / self.budget) + extra
      if not below(progress):
        continue
      if self._varies(stage):
        progress, steps, stage_exact = _step_varying(progress, steps, h, below, target, cost)
        exact &= stage_exact
      else:
        plain = cost(False, 0.0)
        hessian = cost(True, 0.0) if h else plain
        progress, steps = _step_constant(progress, steps, h, below, target, plain, hessian)
        # Whole-number charges add up exactly; fractional ones (RST seconds, expected scoring
        # passes) are summed step by step by the loop and may land one step off the product.
        exact &= float(plain).is_integer() and float(hessian).is_integer() and not extra
    return steps, exact

  def _varies(self, stage: Stage) -> bool:
    """True when a step's charge depends on the budget fraction it starts at."""
    return stage.layer_fraction is not None and self.unit in ("rst_seconds", "layer_tokens")


EXACT_VARYING_STEPS = 20_000  # a varying stage is stepped exactly up to this many steps


def is_hessian_step(step: int, h: int) -> bool:
  """Sophia-G's Hessian step: every h-th step (the loop's test)."""
  return bool(h) and step % h == h - 1


def _step_constant(progress, steps, h, below, target, plain, hessian):
  """(progress, steps) after a stage of constant charges ``plain`` (``hessian`` every h-th
  step) has run until ``below(progress)`` fails; O(h) work whatever the stage's length."""
  if not plain > 0 or not hessian > 0:
    raise ValueError(f"a step must charge a positive amount of the budget, got {plain} / {hessian}")
  charge = lambda s: hessian if is_hessian_step(s, h) else plain
  if not h or hessian == plain:
    n = max(0, math.ceil((target - progress) / plain) - 1)
    progress, steps = progress + n * plain, steps + n
  else:
    while below(progress) and steps % h:  # to the start of a period of h steps
      progress, steps = progress + charge(steps), steps + 1
    period = (h - 1) * plain + hessian
    k = max(0, math.floor((target - progress) / period) - 1)
    progress, steps = progress + k * period, steps + k * h
  while below(progress):  # the last few steps one at a time: exactly the loop's test
    progress, steps = progress + charge(steps), steps + 1
  return progress, steps


def _step_varying(progress, steps, h, below, target, cost):
  """``_step_constant`` for charges that depend on the progress: stepped exactly for up to
  ``EXACT_VARYING_STEPS`` steps, then estimated (returns exact=False)."""
  for _ in range(EXACT_VARYING_STEPS):
    if not below(progress):
      return progress, steps, True
    progress, steps = progress + cost(is_hessian_step(steps, h), progress), steps + 1
  # The rest: steps ~ the integral of 1 / (mean charge) over the remaining progress (midpoints).
  n_points = 256
  width = (target - progress) / n_points
  mean_cost = lambda p: cost(False, p) * (1 - 1 / h if h else 1) + (cost(True, p) / h if h else 0)
  rest = sum(width / mean_cost(progress + (j + 0.5) * width) for j in range(n_points))
  return target, steps + max(1, math.ceil(rest)), False


def baseline_plan(unit: str, budget: float, tokens_per_step: int) -> Plan:
  return Plan((Stage("full", 1.0),), unit, float(budget), tokens_per_step)


def with_step_costs(plan: Plan, step_costs: dict) -> Plan:
  return dataclasses.replace(plan, step_costs=dict(step_costs))


def crossed(prev_fraction: float, fraction: float, every: float) -> bool:
  """True when a multiple of ``every`` lies in (prev_fraction, fraction]."""
  if every <= 0:
    return False
  return int(fraction / every + 1e-9) > int(prev_fraction / every + 1e-9)
