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
    if not self.budget > 0:
      raise ValueError(f"budget.value must be positive, got {self.budget}")
    if not self.stages:
      raise ValueError("a plan needs at least one stage")
    ends = [s.end for s in self.stages]
    if any(b <= a for a, b in zip(ends, ends[1:])) or ends[0] <= 0:
      raise ValueError(f"stage ends must increase within (0, 1], got {ends}")
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
    """Steps the plan will run (each stage's steps until its end fraction is reached; batch
    selection's scoring passes at their expected rate)."""
    progress, steps = 0.0, 0
    per_step = self.scoring.passes_per_step if self.scoring is not None else 0.0
    while progress < self.budget:
      hessian = bool(hessian_interval) and steps % hessian_interval == hessian_interval - 1
      fraction = progress / self.budget
      progress += self.charge(self.stages[self.stage_index(fraction)], hessian, fraction)
      progress += per_step * self.scoring_charge(1)
      steps += 1
    return steps


def baseline_plan(unit: str, budget: float, tokens_per_step: int) -> Plan:
  return Plan((Stage("full", 1.0),), unit, float(budget), tokens_per_step)


def with_step_costs(plan: Plan, step_costs: dict) -> Plan:
  return dataclasses.replace(plan, step_costs=dict(step_costs))


def crossed(prev_fraction: float, fraction: float, every: float) -> bool:
  """True when a multiple of ``every`` lies in (prev_fraction, fraction]."""
  if every <= 0:
    return False
  return int(fraction / every + 1e-9) > int(prev_fraction / every + 1e-9)
