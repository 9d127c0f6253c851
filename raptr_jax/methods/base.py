"""The method interface: everything a training method tells the run, and nothing more.

The loop, the step, RST, FLOPs and the comparison runner never name a method. They ask the
method of ``cfg.method.name`` (``methods.get_method``) these questions; every hook has a neutral
default, so a method overrides only what it changes:

* ``validate(cfg)``: config-time checks; raise ``ValueError`` naming the key and a value that
  works. Runs inside ``config.validate``, before anything is built.
* ``stages(cfg, model_cfg)``: the plan's stages (``plan.Stage``): where each ends on the run's
  clock (a budget fraction), its static shape key, its ``select(key, batch, progress)`` (traced
  inside the jitted step; a ``Selection`` or None), the architecture it runs (``view``: model
  fields of a smaller model whose parameters are the leading slices of the full ones, e.g.
  ``{"num_layers": 4}``), and what its steps cost (``active_layers``, ``width``,
  ``layer_fraction``, ``tokens_per_step``, ``token_drop``), from which FLOPs, MFU, layer-token
  and RST charges follow.
* ``transition(state, old, new, ctx)``: a host-side transform of the train state (params and
  optimizer state) when the run enters stage ``new`` from ``old``: growth operators. Called
  once per boundary crossed, in order, also when a run resumes before a boundary.
* ``transform_updates(updates, progress)`` (after the optimizer, before the LR): a per-step
  hook traced inside the jitted step (interlocking backprop). None: not applied.
* ``value_and_grad(ctx, model_of)``: replaces the step's ``jax.value_and_grad`` of the family
  loss with a function ``(params, batch, selection) -> ((loss, aux), grads)`` whose gradients
  are not those of one scalar (interlocking backprop routes each loss to some parameters).
  ``aux["method_metrics"]`` (optional) is logged with every logged step.
* ``modelled_step(run, stage, state, batch, steps, warmup)``: RST calibration of a step whose
  reference time is modelled rather than measured (interlocking backprop on K devices).
* ``pipelines``: True when the method runs over the mesh's ``stage`` axis (``mesh.stage > 1``,
  one component per stage device, interlocking backprop); every other method is refused there.
* ``model_fields(cfg)``: fields of the ``ModelConfig`` the method needs set (interlocking's
  auxiliary heads); ``optimizer_config(opt_cfg)``: the optimizer section the run builds its
  optimizer from (interlocking moves gradient clipping into its components).
* ``scoring(cfg)`` and ``batch_feed(run, batches)``: batch selection. ``scoring`` says how many
  candidate rows one forward-only scoring pass scores (the training stream then yields batches
  of that many rows) and how many passes a step needs on average (a ``plan.Scoring``, or None);
  ``batch_feed`` returns the host-side ``methods.batch_selection.BatchFeed`` that scores
  candidates on the device and hands the loop each train batch and its number of passes, which
  the plan charges (``Plan.scoring_charge``).
* ``prepare``: one-off work the method needs before it trains, as ``"module:function"`` names
  of ``function(cfg)`` (RHO loss: ``raptr_jax.il_losses:build``, its irreducible-loss store).
  The comparison runner runs them; a training run missing their output stops and names them.
* ``lr_schedule(cfg, plan, lr_fn)``: the learning rate as a function of the budget fraction,
  given the run's ``lr_fn`` (RaPTr's paper LR decays only in its final stage).
* ``metrics(stage, fraction)``: host-side values logged with every logged step.
* ``composes_with``: names of methods this one can be combined with (``method.name="a+b"``,
  ``methods/compose.py``: the product of both plans, selections merged field by field); every
  other pair is rejected at config validation. ``check_partner(cfg, model_cfg, stages)``
  (optional) refuses a partner's stages this method cannot run beside.

Adding a method: write ``methods/mine.py`` with a ``Method`` subclass (docstring: its paper,
algorithm and defaults), add its options to ``config.base_config().method.mine``, and add one
line to ``REGISTRY`` in ``methods/__init__.py``.
"""
from typing import Callable

from raptr_jax.plan import Scoring, Stage


class Method:
  """A training method's answers to the run; the base class is plain full-model training.

  An instance is built for one run's config (``self.cfg``; None for config-free use)."""
  name: str = "baseline"
  composes_with: tuple[str, ...] = ()
  prepare: tuple[str, ...] = ()            # "module:function(cfg)" run once before training
  pipelines: bool = False                  # runs over the mesh's stage axis when mesh.stage > 1

  def __init__(self, cfg=None):
    self.cfg = cfg

  def validate(self, cfg) -> None:
    """Raises ValueError (naming the key and a working value) for options that cannot run."""

  def stages(self, cfg, model_cfg) -> tuple[Stage, ...]:
    """The plan's stages for ``cfg`` and the run's ``models.ModelConfig``."""
    return (Stage("full", 1.0),)

  def transition(self, state, old: Stage, new: Stage, ctx):
    """The train state entering ``new`` from ``old`` (``ctx``: ``step.StepContext``)."""
    return state

  transform_updates: Callable | None = None  # (updates, progress) -> updates
  value_and_grad: Callable | None = None    # (ctx, model_of) -> (params, batch, selection) -> ((loss, aux), grads)

  def modelled_step(self, run, stage, state, batch, steps: int, warmup: int) -> dict | None:
    """RST calibration: what a train step of ``stage`` is charged when it is not this device's
    time of the compiled step, as ``{"seconds": ..., ...}`` (the rest is recorded in the table;
    interlocking backprop: its K-device time model); None: the compiled step is timed."""
    return None

  def model_fields(self, cfg) -> dict:
    """``ModelConfig`` fields this method sets (e.g. auxiliary heads), merged into the model."""
    return {}

  def optimizer_config(self, opt_cfg):
    """The ``optimizer`` section the run's optimizer is built from."""
    return opt_cfg

  def scoring(self, cfg) -> Scoring | None:
    """Forward-only scoring passes per train step (batch selection), or None."""
    return None

  def batch_feed(self, run, batches):
    """The ``BatchFeed`` that makes this method's train batches from ``batches`` (candidate
    batches of ``scoring(cfg).rows`` rows); called once per run when ``scoring`` is not None."""
    raise NotImplementedError(f"method {self.name!r} declares scoring passes but no batch_feed")

  def lr_schedule(self, cfg, plan, lr_fn: Callable) -> Callable:
    """The LR as a function of the budget fraction; ``lr_fn`` is the run's schedule."""
    return lr_fn

  def metrics(self, stage: Stage, fraction: float) -> dict:
    """Extra values to log at a logged step of ``stage``; ``fraction`` is the budget fraction
    after the step (the row's ``progress``)."""
    return {}

  def meta(self, cfg) -> dict:
    """What a checkpoint records of this method (and must match on resume)."""
    section = cfg.method.get(self.name)
    return {"name": self.name, **({self.name: section.to_dict()} if section is not None else {})}
