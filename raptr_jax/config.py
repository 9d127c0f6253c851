"""The run configuration: every field with its default, and validation with clear messages.

Config files (``configs/*.py``) start from ``base_config()`` and change fields; the CLI applies
``--config.a.b=value`` overrides on top. ``validate`` rejects fields that ``base_config`` does
not define (a typo must not silently do nothing) and values that cannot work.
"""
import ml_collections
from ml_collections.config_dict import placeholder

from raptr_jax.optim import check_optimizer
from raptr_jax.optim.schedules import check_schedule
from raptr_jax.plan import UNITS


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.budget = dict(unit="steps", value=1000.0,  # unit: steps | tokens | rst_seconds | rst_hours
                  rst_table="",                # RST calibration table (default rst_table.json)
                  free_hessian=False,          # RST: Sophia's Hessian passes cost nothing
                  free_scoring=False)          # RST: forward-only scoring passes cost nothing
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.distributed = dict(initialize=False)  # jax.distributed.initialize() for multi-host runs
  c.model = dict(
      family="decoder", vocab_size=0,  # 0: the vocabulary's size (padded to a multiple of 128)
      d_model=256, num_layers=4, num_heads=4, head_dim=64, mlp_dim=1024, gated_mlp=True,
      activation="gelu", position="rotary", max_len=2048, tied_embeddings=False,
      dtype="bfloat16", param_dtype="float32", remat="none", scan_layers=True,
      norm_eps=1e-6, init_std=0.02, attention_impl=None)
  c.data = dict(
      source="builtin", vocab_path="", objective="ul2", denoisers=(), seq_len=256,
      batch_size=32)
  c.optimizer = dict(
      name="adamw",              # adamw | lion | sophia_g | sophia_h | adafactor
      b1=placeholder(float), b2=placeholder(float),  # None: the optimizer's own defaults
      eps=1e-8, weight_decay=0.1, grad_clip=1.0,
      mu_dtype="",               # e.g. "bfloat16" for bf16 first moments (adamw, lion, sophia_g)
      decay_rate=0.8, multiply_by_parameter_scale=False,                    # adafactor
      rho=0.05, gamma=0.01, sophia_parameterization="official",            # sophia
      hessian_interval=10, hessian_grad_clip=1.0,
      rms_scaling=False, rms_min_scale=1e-3,  # lr x max(min_scale, RMS(param)) (T5 runs of NTNG)
      freeze_inactive=False)     # True: params a step leaves out keep params and moments
  c.schedule = dict(name="cosine", peak=1e-3, warmup=0.05, final=0.1)
  c.eval = dict(every=0.25, batches=8, at_start=True)  # every: budget fraction; batches: 0 = whole split
  c.checkpoint = dict(every=200, keep=2, async_save=True)  # every: steps; 0 = only at the end
  c.log = dict(every=10, tensorboard=True, progress_bar=True)
  c.train = dict(peak_flops=0.0, stop_at_step=0)  # peak_flops 0: device table; stop_at_step: simulate a kill
  return c


def _check_keys(cfg, ref, path=""):
  for key in cfg.keys():
    where = f"{path}{key}"
    if key not in ref:
      raise ValueError(f"unknown config field {where!r}; known fields here: {sorted(ref.keys())}")
    if isinstance(ref[key], ml_collections.ConfigDict):
      if not isinstance(cfg[key], ml_collections.ConfigDict):
        raise ValueError(f"config field {where!r} must be a section, got {cfg[key]!r}")
      _check_keys(cfg[key], ref[key], where + ".")


def validate(cfg) -> None:
  """Raises ValueError naming the field and the fix; returns None when the config can run."""
  _check_keys(cfg, base_config())
  if cfg.budget.unit not in UNITS + ("rst_hours",):
    raise ValueError(f"budget.unit must be one of {UNITS + ('rst_hours',)}, got {cfg.budget.unit!r}")
  if not cfg.budget.value > 0:
    raise ValueError(f"budget.value must be positive, got {cfg.budget.value}")
  check_optimizer(cfg.optimizer)
  check_schedule(cfg.schedule.name, cfg.schedule.warmup, cfg.schedule.final)
  if not cfg.schedule.peak > 0:
    raise ValueError(f"schedule.peak must be positive, got {cfg.schedule.peak}")
  if cfg.data.source not in ("builtin", "synthetic"):
    raise ValueError(f"data.source must be 'builtin' (the corpus shipped in the package) or "
                     f"'synthetic' (benchmarks), got {cfg.data.source!r}")
  if cfg.data.batch_size <= 0 or cfg.data.seq_len <= 8:
    raise ValueError(f"data.batch_size must be > 0 and data.seq_len > 8, got "
                     f"{cfg.data.batch_size} and {cfg.data.seq_len}")
  if cfg.model.position == "learned" and cfg.data.seq_len > cfg.model.max_len:
    raise ValueError(f"data.seq_len {cfg.data.seq_len} exceeds model.max_len {cfg.model.max_len} "
                     "of the learned position table; raise model.max_len")
  if not 0 <= cfg.eval.every <= 1:
    raise ValueError(f"eval.every is a fraction of the budget in [0, 1], got {cfg.eval.every}")
  for name in ("every", "keep"):
    if cfg.checkpoint[name] < 0:
      raise ValueError(f"checkpoint.{name} must be >= 0, got {cfg.checkpoint[name]}")
  if cfg.log.every <= 0:
    raise ValueError(f"log.every must be positive, got {cfg.log.every}")
