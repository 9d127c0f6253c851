"""Runs that start from a pretrained model: an import, a transformers directory or a trained run.

``init.source`` names where the parameters come from; a workdir that holds an import
(``python -m raptr_jax.hf import``, which writes ``WORKDIR/pretrained/``) is its own source when
``init.source`` is empty. A source is

* an **import**: ``pretrained/pretrained.json`` (the model section and tokenizer it gives the
  run), ``pretrained/params`` (an orbax checkpoint of the parameters) and
  ``pretrained/tokenizer/`` (the checkpoint's tokenizer files);
* a **transformers checkpoint directory** (``config.json`` with a ``model_type``), read tensor by
  tensor straight onto the mesh (``hf/convert.py``);
* a **trained run**'s workdir (its ``config.json`` and newest checkpoint).

``resolve(cfg, workdir)`` sets the run's config from the source: for the workdir's own import,
the whole model section and the vocabulary (continued pretraining of that model, any method);
for an explicit ``init.source``, every architecture option and the vocabulary but not the sizes
(``SIZE_FIELDS``: the run may be larger, growth and stacking from a pretrained model).
``load(run, state, source)`` fills the fresh train state's parameters: the source's parameters
when the shapes are the run's, or the leading slices of the run's first stage (``Stage.view``,
the smaller model growth and stacking start from) when they are that stage's, else an error
naming the sizes. Optimizer state starts fresh, as the method's own first step would have it.
"""
import dataclasses
import json
import os

import jax
from flax import nnx

IMPORT_DIR = "pretrained"
IMPORT_META = "pretrained.json"
SIZE_FIELDS = ("d_model", "num_layers", "num_decoder_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
               "max_len")
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "scan_layers", "attention_impl", "select_stacks")


class SourceError(ValueError):
  pass


def has_import(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, IMPORT_DIR, IMPORT_META))


@dataclasses.dataclass
class Source:
  kind: str                  # import | hf | run
  path: str
  model: dict                # model section fields it sets (family included)
  vocab_path: str = ""       # its tokenizer ("" : none)
  extra_ids: int | None = None

  @property
  def description(self) -> str:
    return {"import": "the imported checkpoint", "hf": "the transformers checkpoint",
            "run": "the trained run"}[self.kind] + f" {self.path}"


def open_source(path: str) -> Source:
  """The source at ``path`` (an import's workdir, a transformers directory, a trained run)."""
  path = os.path.abspath(path)
  if has_import(path):
    with open(os.path.join(path, IMPORT_DIR, IMPORT_META)) as f:
      meta = json.load(f)
    vocab = os.path.join(path, IMPORT_DIR, meta["data"]["vocab_file"]) if meta["data"].get("vocab_file") else ""
    return Source("import", path, dict(meta["model"]), vocab, meta["data"].get("extra_ids"))
  config = os.path.join(path, "config.json")
  if not os.path.exists(config):
    raise SourceError(f"init.source={path!r} is neither a workdir with an import (pretrained/pretrained.json), a "
                      "transformers checkpoint directory nor a trained run's workdir (no config.json there)")
  with open(config) as f:
    conf = json.load(f)
  if "model_type" in conf:
    from raptr_jax.hf.convert import HFCheckpoint  # pylint: disable=g-import-not-at-top
    checkpoint = HFCheckpoint.open(path)
    vocab = os.path.join(path, checkpoint.vocab_file) if checkpoint.vocab_file else ""
    return Source("hf", path, dict(checkpoint.fields, vocab_multiple=1), vocab, checkpoint.extra_ids)
  if "model" in conf and os.path.isdir(os.path.join(path, "checkpoints")):
    data = conf.get("data", {})
    return Source("run", path, dict(conf["model"]), data.get("vocab_path", ""), data.get("extra_ids"))
  raise SourceError(f"init.source={path!r}: its config.json is neither a transformers config (model_type) nor a "
                    "run's config with checkpoints/")


def resolve(cfg, workdir: str, announce: bool = False):
  """(cfg with the source's model and vocabulary fields, the ``Source`` or None): the source
  is ``init.source``, else the workdir's own import. ``announce`` prints every field set or
  changed."""
  own = not cfg.init.source and has_import(workdir)
  if not (cfg.init.source or own):
    return cfg, None
  source = open_source(cfg.init.source or workdir)
  changes = apply(cfg, source, sizes=own)
  if announce and changes:
    print(f"from {source.description}:")
    for key, (was, now) in changes.items():
      print(f"  {key}: {was!r} -> {now!r}")
  return cfg, source


def apply(cfg, source: Source, sizes: bool) -> dict:
  """Sets ``cfg``'s model fields from ``source`` (the sizes too when ``sizes``; never how it
  runs: dtype, remat, ...) and its vocabulary (when ``sizes`` or the config names none);
  returns {field: (before, after)} of what changed."""
  if source.model.get("family", cfg.model.family) != cfg.model.family:
    example = {"decoder": "gpt", "t5": "t5", "bert": "bert"}.get(source.model["family"], source.model["family"])
    raise SourceError(f"{source.description} is a model.family={source.model['family']!r} model, but this run's "
                      f"config trains model.family={cfg.model.family!r}; use a config of that family, e.g. "
                      f"configs/{example}.py")
  changes = {}
  for key, value in source.model.items():
    if key in RUNTIME_FIELDS or key == "family" or key not in cfg.model or (not sizes and key in SIZE_FIELDS):
      continue
    if cfg.model[key] != value:
      changes[f"model.{key}"] = (cfg.model[key], value)
      cfg.model[key] = float(value) if isinstance(cfg.model[key], float) else value
  if source.vocab_path and (sizes or not cfg.data.vocab_path):
    for key, value in (("vocab_path", source.vocab_path), ("extra_ids", source.extra_ids)):
      if value is not None and cfg.data[key] != value:
        changes[f"data.{key}"] = (cfg.data[key], value)
        cfg.data[key] = value
  return changes


def source_params(run, source: Source, model_cfg):
  """The source's parameters for the model ``model_cfg`` (the run's, or its first stage's), on
  the run's mesh with the parameters' shardings."""
  from raptr_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  from raptr_jax.models import get_family  # pylint: disable=g-import-not-at-top
  module = get_family(run.cfg.model.family).module
  abstract = nnx.state(nnx.eval_shape(lambda: module(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)
  axes = shd.logical_axes_tree(abstract)
  pure = nnx.to_pure_dict(abstract)
  shardings = shd.param_shardings(pure, axes, run.mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), pure, shardings)
  if source.kind == "import":
    return restore_params(os.path.join(source.path, IMPORT_DIR, "params"), target)
  if source.kind == "hf":
    from raptr_jax.hf.convert import HFCheckpoint, place_params  # pylint: disable=g-import-not-at-top
    return place_params(target, model_cfg, HFCheckpoint.open(source.path))
  from raptr_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from raptr_jax.run import setup  # pylint: disable=g-import-not-at-top
  from raptr_jax.workdir import config_from_workdir  # pylint: disable=g-import-not-at-top
  source_run = setup(config_from_workdir(source.path))  # the config its checkpoints were written under
  checkpointer = ckpt_lib.Checkpointer(os.path.join(source.path, "checkpoints"), 0, False, writer=False)
  try:
    _, state, _, _ = checkpointer.restore_latest(source_run.abstract_state, {})
  finally:
    checkpointer.close()
  return jax.tree.map(lambda p, t: jax.device_put(p, t.sharding), state.params, target)


def restore_params(directory: str, target):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.abspath(directory), target)


def _matches(source: Source, m) -> bool:
  """Whether the source's sizes are those of the model ``m`` (a ``ModelConfig``)."""
  s = source.model
  for key in ("d_model", "num_layers", "num_heads", "head_dim", "mlp_dim"):
    if key in s and s[key] != getattr(m, key):
      return False
  if m.position == "learned" and s.get("max_len", m.max_len) != m.max_len:
    return False
  if (s.get("num_kv_heads") or s.get("num_heads", m.num_heads)) != m.kv_heads:
    return False
  return s.get("family") != "t5" or (s.get("num_decoder_layers") or s.get("num_layers")) == m.decoder_layers


def load(run, state, source: Source):
  """``state`` with its parameters from ``source``: the whole model when the sizes are the run's;
  the leading slices of the first stage's smaller model when they are that stage's (growth,
  stacking); else an error naming the sizes."""
  stage = run.plan.stages[0]
  if _matches(source, run.model_cfg):
    return dataclasses.replace(state, params=source_params(run, source, run.model_cfg))
  if stage.view and _matches(source, view_cfg := dataclasses.replace(run.model_cfg, **stage.view)):
    small = source_params(run, source, view_cfg)
    place = jax.jit(lambda full, small: jax.tree.map(
        lambda f, s: s if f.shape == s.shape else f.at[tuple(slice(0, n) for n in s.shape)].set(s), full, small),
        out_shardings=run.steps.ctx.state_shardings.params, donate_argnums=0)
    return dataclasses.replace(state, params=place(state.params, small))
  sizes = {k: v for k, v in source.model.items() if k in SIZE_FIELDS}
  ours = {k: getattr(run.model_cfg, k) for k in sizes}
  first = f" nor its first stage's {stage.view}" if stage.view else ""
  raise SourceError(f"{source.description} holds a model of {sizes}, which is neither this run's model {ours}{first}; "
                    "set model.* to the source's sizes, or grow from it (method.name=growth or stacking with the "
                    "source's sizes as the first stage, and method.growth.grow_at=(0.0, ...) to grow at the start)")
