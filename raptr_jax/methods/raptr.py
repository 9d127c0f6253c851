"""RaPTr: progressive random subnetwork training (Panigrahi et al., 2024, "Efficient Stagewise
Pretraining via Progressive Subnetworks"; Algorithm 1, Definition 2.2, Appendices E, G, J).

Schedule ``T_{1:k} x (p_{1:k}, I_{1:k})``: in stage s every layer outside the fixed set ``I_s``
is kept with probability ``p_s``; layers in ``I_s`` always run. The paper writes schedules by
average subnetwork length, "6-8-10-12" for L = 12: stage s keeps ``l_s = |I| + p_s (L - |I|)``
layers on average. Defaults (Section 4's recommendation): 4 stages starting at L/2 and growing
by L/6, fixed set = first and last layer, Equal stage lengths, square-root output scaling.

* Stage lengths (Appendix E): ``equal`` (k equal stages), ``proportional`` (stage s has length
  proportional to s: 12-16-20-24 over 400k steps -> 40k, 80k, 120k, 160k, average length 20), and
  a target average length: take the closer of Equal and Proportional, then move x steps from each
  of the first k - 1 stages to the last (6-12-18-24 with target 20: x = 22.2k of 400k). An
  initial full-model phase (30k steps in D.5) shifts every boundary by its length and shortens
  the final full-model stage by as much, so the average length is unchanged.
* Selection (Appendix G): the linear-combination shared subnetwork. ``fixed_count`` (default)
  runs exactly ``round(l_s)`` layers: the fixed set plus a uniformly random subset of the rest,
  gathered from the stacked parameters inside the jitted step, so a stage compiles once and each
  parameter gets a gradient (exactly zero when unselected). ``grouped`` (the Appendix G remark)
  draws one subset for groups of ``group`` consecutive layers at a time. ``bernoulli`` is
  Definition 2.2 exactly (each layer independently): its count varies per step, so the step
  scans all L layers and skips the dropped ones with ``lax.cond`` (one compile per stage; the
  dropped layers cost no FLOPs, but each layer is a separate kernel launch sequence, XLA cannot
  fuse across the branch, and activation memory is reserved for all L layers).
* Output scaling (Appendix J): ``sqrt`` (h_sqrt: a kept layer j is scaled by sqrt(j' - j), j' the
  next kept layer, L + 1 after the last, so the squared scales up to each kept layer sum to its
  depth), ``none``, or ``inverse_p`` (1/p_s on the non-fixed layers). Evaluation runs the full
  model with unit scales.
* Width (Section 4.3), ``axis``: ``heads`` (Attention-RaPTr: each layer runs a random subset of
  its N heads, growing across stages) or ``mlp`` (MLP-RaPTr: the hidden units split into
  ``mlp_parts`` = 4 equal parts, each layer runs a random subset of them). Same schedule API,
  counted in heads or parts (default: the recommended N/2, +N/6, 4 stages, rounded; no fixed
  set). The layer's weights are gathered to the chosen heads / parts, so the matmuls shrink.
  The paper does not say how width subnetworks are scaled; the default ``inverse_p`` multiplies
  the narrowed branch by N / h (P / m), so its expectation is the full branch (dropout's
  convention); ``none`` is the alternative.
"""
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from raptr_jax.methods.base import Method
from raptr_jax.models.selection import LayerSelection, Selection, WidthSelection
from raptr_jax.plan import Stage

AXES = ("depth", "heads", "mlp")
LENGTH_MODES = ("equal", "proportional")
SCALINGS = ("sqrt", "none", "inverse_p")
WIDTH_SCALINGS = ("inverse_p", "none")
SELECTIONS = ("fixed_count", "grouped", "bernoulli")


@dataclasses.dataclass(frozen=True)
class RaptrStage:
  p: float                 # keep probability of the non-fixed layers
  fixed: tuple[int, ...]   # layers that always run (0-based)
  length: float            # in the budget's unit

  def average_layers(self, num_layers: int) -> float:
    return len(self.fixed) + self.p * (num_layers - len(self.fixed))


def layer_ids(ids, num_layers: int, key: str = "method.raptr.fixed") -> tuple[int, ...]:
  """Sorted 0-based layer ids; negative ids count from the end (-1: the last layer); an id
  outside the model is an error, never wrapped onto another layer."""
  out = set()
  for i in ids:
    i = int(i)
    if not -num_layers <= i < num_layers:
      raise ValueError(f"{key}: layer {i} is outside the {num_layers}-layer model; ids are 0..{num_layers - 1} "
                       f"(or -1 for the last), e.g. {key}=(0, {num_layers - 1})")
    out.add(i % num_layers)
  return tuple(sorted(out))


def recommended_lengths(num_layers: int, minimum: float = 0.0) -> list[float]:
  """Section 4's schedule: L/2, then + L/6 per stage, 4 stages (6-8-10-12 for L = 12); no
  stage below ``minimum`` (the fixed set: 2-2-2.5-3 for L = 3 with I = {first, last})."""
  return [max(minimum, num_layers / 2 + i * num_layers / 6) for i in range(4)]


def parse_notation(notation: str) -> list[float]:
  """'6-8-10-12' -> [6, 8, 10, 12] (average subnetwork lengths per stage)."""
  if not re.fullmatch(r"\s*\d+(\.\d+)?(\s*-\s*\d+(\.\d+)?)*\s*", notation or ""):
    raise ValueError(f"RaPTr schedule {notation!r} is not in the paper's notation, e.g. '6-8-10-12'")
  return [float(x) for x in notation.split("-")]


def average_length(lengths, stage_lengths) -> float:
  return float(np.dot(lengths, stage_lengths) / np.sum(stage_lengths))


def stage_lengths(avg_lengths, total: float, mode: str = "equal", target_average: float = 0.0,
                  initial_full: float = 0.0, num_layers: int | None = None) -> list[float]:
  """Stage lengths (Appendix E) in the budget's unit, the initial full-model phase first if any.

  ``target_average`` > 0: start from whichever of Equal / Proportional has the closer average
  subnetwork length, and move x from each of the first k - 1 stages to the last to hit it."""
  k = len(avg_lengths)
  if mode not in LENGTH_MODES:
    raise ValueError(f"RaPTr stage lengths must be one of {LENGTH_MODES}, got {mode!r}")
  if not 0 <= initial_full < total:
    raise ValueError(f"the initial full-model phase ({initial_full}) must be shorter than the budget ({total})")
  candidates = {"equal": [total / k] * k,
                "proportional": [total * (s + 1) / (k * (k + 1) / 2) for s in range(k)]}
  lengths = candidates[mode]
  if target_average:
    mode = min(LENGTH_MODES, key=lambda m: abs(average_length(avg_lengths, candidates[m]) - target_average))
    lengths = list(candidates[mode])
    gain = sum(avg_lengths[-1] - a for a in avg_lengths[:-1])  # average gained per unit of x, x total
    if k < 2 or gain <= 0:
      raise ValueError("a target average length needs at least two stages with a growing schedule")
    x = (target_average - average_length(avg_lengths, lengths)) * total / gain
    lengths = [l - x for l in lengths[:-1]] + [lengths[-1] + (k - 1) * x]
    if min(lengths) <= 0:
      raise ValueError(f"target average length {target_average} cannot be reached with this schedule "
                       f"(stage lengths would be {lengths})")
  if initial_full:
    if num_layers is not None and avg_lengths[-1] != num_layers:
      raise ValueError("an initial full-model phase is taken from the final stage, which must be the full model")
    if lengths[-1] <= initial_full:
      raise ValueError(f"the initial full-model phase ({initial_full}) must be shorter than the final stage ({lengths[-1]})")
    lengths = [initial_full] + lengths[:-1] + [lengths[-1] - initial_full]
  return lengths


def build_schedule(num_layers: int, avg_lengths=None, fixed=None, total: float = 1.0, mode: str = "equal",
                   target_average: float = 0.0, initial_full: float = 0.0) -> list[RaptrStage]:
  """The stages ``T_{1:k} x (p_{1:k}, I_{1:k})`` from average lengths (default: recommended)."""
  L = num_layers
  fixed = tuple(sorted({0, L - 1})) if fixed is None else layer_ids(fixed, L)
  avg_lengths = list(avg_lengths or recommended_lengths(L, len(fixed)))
  for a, b in zip(avg_lengths, avg_lengths[1:]):
    if b < a:
      raise ValueError(f"RaPTr schedule {avg_lengths} is not monotone: subnetwork sizes must not shrink")
  for a in avg_lengths:
    if not len(fixed) <= a <= L:
      raise ValueError(f"RaPTr subnetwork size {a:g} is outside [|I| = {len(fixed)}, L = {L}]")
  lengths = stage_lengths(avg_lengths, total, mode, target_average, initial_full, L)
  if initial_full:
    avg_lengths = [float(L)] + avg_lengths
  p = lambda a: 1.0 if L == len(fixed) else (a - len(fixed)) / (L - len(fixed))
  return [RaptrStage(p(a), fixed, length) for a, length in zip(avg_lengths, lengths)]


def check_stages(stages, num_layers: int, total: float, initial_full: bool = False) -> None:
  """Rejects explicit schedules that shrink, escape [|I|, L] or do not sum to the budget (an
  initial full-model phase, ``initial_full``, may precede the schedule)."""
  for s in stages:
    if not 0.0 <= s.p <= 1.0 or any(not 0 <= i < num_layers for i in s.fixed):
      raise ValueError(f"RaPTr stage {s}: p must be in [0, 1] and fixed layers in [0, {num_layers})")
  schedule = stages[1:] if initial_full else stages
  for a, b in zip(schedule, schedule[1:]):
    if b.p < a.p or not set(a.fixed) <= set(b.fixed):
      raise ValueError(f"RaPTr stages must not shrink (p non-decreasing, I growing): {a} then {b}")
  if abs(sum(s.length for s in stages) - total) > 1e-6 * total:
    raise ValueError(f"RaPTr stage lengths sum to {sum(s.length for s in stages):g}, not the budget {total:g}")


def sqrt_scales(indices, num_layers: int):
  """h_sqrt of Appendix J for sorted kept layer indices (0-based): sqrt(next kept - this),
  with L after the last kept layer."""
  indices = jnp.asarray(indices)
  nxt = jnp.concatenate([indices[1:], jnp.array([num_layers], indices.dtype)])
  return jnp.sqrt((nxt - indices).astype(jnp.float32))


def stage_size(stage: RaptrStage, num_layers: int) -> int:
  """Layers a fixed-count step runs: round(|I| + p (L - |I|))."""
  return int(round(stage.average_layers(num_layers)))


def make_select(stage: RaptrStage, num_layers: int, scaling: str = "sqrt", selection: str = "fixed_count",
                group: int = 1):
  """``select(key, batch, progress) -> Selection`` for one stage (None when the stage is the
  full model)."""
  L = num_layers
  if scaling not in SCALINGS or selection not in SELECTIONS:
    raise ValueError(f"RaPTr scaling must be one of {SCALINGS} and selection one of {SELECTIONS}")
  fixed = np.asarray(stage.fixed, np.int32)
  free = np.setdiff1d(np.arange(L), fixed).astype(np.int32)
  k = stage_size(stage, L)
  if stage.p >= 1.0 or k >= L:
    return None

  def scales_of(indices, kept):
    if scaling == "sqrt":
      return sqrt_scales(indices, L) * kept
    if scaling == "inverse_p":
      return jnp.where(jnp.isin(indices, fixed), 1.0, 1.0 / max(stage.p, 1e-12)) * kept
    return kept

  if selection == "bernoulli":
    def select(key, batch, progress):
      keep = jax.random.bernoulli(key, stage.p, (L,)) | jnp.isin(jnp.arange(L), fixed)
      idx = jnp.arange(L, dtype=jnp.int32)
      if scaling == "sqrt":  # next kept layer of each kept layer, over the kept ones only
        pos = jnp.where(keep, idx, L)
        nxt = jax.lax.cummin(jnp.concatenate([pos[1:], jnp.array([L])])[::-1])[::-1]
        scales = jnp.where(keep, jnp.sqrt((nxt - idx).astype(jnp.float32)), 0.0)
      else:
        scales = scales_of(idx, keep.astype(jnp.float32))
      return Selection(layers=LayerSelection(idx, scales, active=keep))
    return select

  n_free = k - len(fixed)
  if selection == "grouped":
    if group < 1 or len(free) % group or n_free % group:
      raise ValueError(f"grouped selection needs group ({group}) to divide the {len(free)} free layers "
                       f"and the {n_free} sampled ones")
  else:
    group = 1

  def select(key, batch, progress):
    groups = jax.random.permutation(key, len(free) // group)[:n_free // group]
    chosen = (groups[:, None] * group + jnp.arange(group)[None]).reshape(-1)
    indices = jnp.sort(jnp.concatenate([jnp.asarray(fixed), jnp.asarray(free)[chosen]]))
    return Selection(layers=LayerSelection(indices.astype(jnp.int32), scales_of(indices, jnp.ones(k))))

  return select


def make_width_select(stage: RaptrStage, axis: str, units: int, num_layers: int,
                      scaling: str = "inverse_p"):
  """Attention-/MLP-RaPTr ``select`` for one stage: each of the ``num_layers`` layers draws
  its own uniformly random ``stage_size`` of ``units`` heads (``axis="heads"``) or MLP parts
  (``axis="mlp"``, ``units`` = parts); None when the stage runs full width."""
  if axis not in AXES[1:] or scaling not in WIDTH_SCALINGS:
    raise ValueError(f"width RaPTr axis must be one of {AXES[1:]} and its scaling one of {WIDTH_SCALINGS}")
  k = stage_size(stage, units)
  if k >= units:
    return None
  scale = units / k if scaling == "inverse_p" else 1.0

  def select(key, batch, progress):
    scores = jax.random.uniform(key, (num_layers, units))
    kept = jnp.sort(jnp.argsort(scores, axis=1)[:, :k], axis=1).astype(jnp.int32)
    if axis == "heads":
      return Selection(width=WidthSelection(heads=kept, head_scale=scale))
    return Selection(width=WidthSelection(mlp=kept, mlp_parts=units, mlp_scale=scale))

  return select


def relative_flops(stages, num_layers: int) -> float:
  """Average layers used / L over the schedule (the paper's FLOP accounting, Appendix E)."""
  total = sum(s.length for s in stages)
  return sum(s.average_layers(num_layers) * s.length for s in stages) / (num_layers * total)


def axis_units(raptr_cfg, model_cfg) -> int:
  """What the schedule counts: layers (depth), heads, or MLP parts."""
  c, m = raptr_cfg, model_cfg
  if c.axis not in AXES:
    raise ValueError(f"method.raptr.axis must be one of {AXES}, got {c.axis!r}")
  if c.axis == "depth":
    return m.num_layers
  if c.axis == "heads":
    return m.num_heads
  if c.mlp_parts < 1 or m.mlp_dim % c.mlp_parts:
    raise ValueError(f"method.raptr.mlp_parts={c.mlp_parts} must divide model.mlp_dim={m.mlp_dim}")
  return c.mlp_parts


def _width_stages(c, units: int) -> list[RaptrStage]:
  if c.selection != "fixed_count":
    raise ValueError(f"width RaPTr (axis={c.axis!r}) draws a fixed count per layer; "
                     f"method.raptr.selection={c.selection!r} is a depth option")
  if c.stages:
    stages = [RaptrStage(float(p), tuple(I), float(f)) for p, I, f in c.stages]
    if any(s.fixed for s in stages):
      raise ValueError(f"width RaPTr (axis={c.axis!r}) has no fixed set: give () as each stage's I")
  else:
    counts = parse_notation(c.schedule) if c.schedule else sorted(max(1, round(a)) for a in recommended_lengths(units))
    if any(a != round(a) or a < 1 for a in counts):
      raise ValueError(f"width RaPTr counts whole {c.axis} per layer (at least 1); method.raptr.schedule="
                       f"{c.schedule!r} is not integral (e.g. '{max(1, units // 2)}-{units}')")
    return build_schedule(units, counts, (), 1.0, c.lengths, c.target_average, c.initial_full)
  return stages


def plan_stages(raptr_cfg, model_cfg):
  """The plan stages (budget fractions, shapes, select functions) of a ``method.raptr`` config
  for the ``model`` section ``model_cfg``."""
  c = raptr_cfg
  num_layers = model_cfg.num_layers
  units = axis_units(c, model_cfg)
  scaling = c.scaling if c.scaling != "auto" else ("sqrt" if c.axis == "depth" else "inverse_p")
  if c.axis != "depth":
    stages = _width_stages(c, units)
  elif c.stages:
    stages = [RaptrStage(float(p), layer_ids(I, num_layers, "method.raptr.stages (fixed layers)"), float(f))
              for p, I, f in c.stages]
  else:
    stages = build_schedule(num_layers, parse_notation(c.schedule) if c.schedule else None,
                            tuple(int(i) for i in c.fixed), 1.0, c.lengths, c.target_average, c.initial_full)
  check_stages(stages, units, 1.0, initial_full=bool(c.initial_full) and not c.stages)
  out, end = [], 0.0
  for i, s in enumerate(stages):
    end += s.length
    name = f"raptr{i + 1}:{s.average_layers(units):g}/{units}" + ("" if c.axis == "depth" else " " + c.axis)
    if c.axis == "depth":
      k = num_layers if c.selection == "bernoulli" else stage_size(s, num_layers)
      select = make_select(s, num_layers, scaling, c.selection, c.group)
      shape = ("raptr", k, s.fixed, round(s.p, 6), c.selection, scaling)
      # Bernoulli: the count varies per step; FLOPs are counted at its expectation.
      active = s.average_layers(num_layers) if c.selection == "bernoulli" else k
      stage = Stage(name, min(end, 1.0), shape, select, active_layers=active)
    else:
      k = stage_size(s, units)
      select = make_width_select(s, c.axis, units, num_layers, scaling)
      width = {"num_heads": k} if c.axis == "heads" else {"mlp_dim": model_cfg.mlp_dim // units * k}
      stage = Stage(name, min(end, 1.0), ("raptr", c.axis, k, units, scaling), select, width=width)
    out.append(stage if select is not None else Stage(name, min(end, 1.0)))
  return tuple(out)


class Raptr(Method):
  """RaPTr on the method interface (``method.name=raptr``, options in ``method.raptr``)."""
  name = "raptr"

  def validate(self, cfg) -> None:
    c = cfg.method.raptr
    if c.axis == "heads" and cfg.model.num_kv_heads:
      raise ValueError("method.raptr.axis='heads' draws heads with their own keys and values; with grouped-query "
                       f"attention (model.num_kv_heads={cfg.model.num_kv_heads}) query heads share them: use "
                       "axis='depth' or 'mlp'")
    if c.lr not in ("run", "paper"):
      raise ValueError(f"method.raptr.lr must be 'run' or 'paper', got {c.lr!r}")
    if c.axis != "depth" and cfg.optimizer.freeze_inactive:
      raise ValueError("optimizer.freeze_inactive freezes whole layers; width RaPTr "
                       f"(method.raptr.axis={c.axis!r}) updates unselected heads/parts with "
                       "their zero gradient: set optimizer.freeze_inactive=False")
    if cfg.model.family == "t5" and cfg.model.num_decoder_layers not in (0, cfg.model.num_layers):
      raise ValueError("method.name=raptr on t5 draws one schedule for both stacks: set "
                       f"model.num_decoder_layers=0 (= model.num_layers={cfg.model.num_layers})")
    try:
      self.stages(cfg, cfg.model)
    except ValueError as e:
      raise ValueError(f"method.raptr: {e}") from None

  def stages(self, cfg, model_cfg):
    return plan_stages(cfg.method.raptr, model_cfg)

  def lr_schedule(self, cfg, plan, lr_fn):
    """Paper LR (Section 4): constant across stages, decaying over the final full-model stage."""
    if cfg.method.raptr.lr == "paper" and len(plan.stages) > 1:
      return functools.partial(lr_fn, decay_start=plan.stages[-2].end)
    return lr_fn
