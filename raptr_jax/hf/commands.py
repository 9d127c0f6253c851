"""``python -m raptr_jax.hf import`` and ``export``: transformers checkpoints into a workdir, and a
workdir's model out to a directory transformers loads.

Import writes ``WORKDIR/pretrained/`` (``pretrained.json``: the model section and vocabulary the
checkpoint gives the run; ``params/``: the parameters as an orbax checkpoint, placed on the
mesh tensor by tensor; ``tokenizer/``: the checkpoint's tokenizer files) and ``WORKDIR/config.json``.
It is written to a temporary folder and renamed when complete: a failed import leaves nothing.
``main`` then continues pretraining that model in the workdir (any method, any budget),
``evaluate`` and ``generate`` read it, and ``export`` writes it back.

Export writes ``config.json``, ``model.safetensors`` (sharded past 5 GB) and the tokenizer
files: the imported ones, or for this project's SentencePiece vocabularies a ``tokenizer.json``
that tokenizes as SentencePiece does (``hf/tokenizer.py``). The model exported is the one the
checkpoint's stage runs: the full model for RaPTr, PLD and random-LTD (their subnetworks share
its weights), the grown model after stacking or growth (the smaller one before the last
growth), interlocking backprop's main network without its auxiliary heads.
"""
import datetime
import json
import os
import shutil

import numpy as np

from raptr_jax import pretrained
from raptr_jax.hf import architectures as arch_lib
from raptr_jax.hf.convert import HFCheckpoint, hf_tensors, place_params
from raptr_jax.hf.tensors import CheckpointFormatError, write_safetensors

IMPORT_MARK = "pretrained.json"  # an import's tokenizer/ folder sits beside it
DTYPES = {"float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}


def _tmp_dir(final: str) -> str:
  tmp = f"{final}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  return tmp


def import_checkpoint(cfg, hf_dir: str, workdir: str, log=print) -> dict:
  """Imports the transformers checkpoint ``hf_dir`` into ``workdir`` under the run config
  ``cfg`` (its family must hold the checkpoint); returns the ``pretrained.json`` record."""
  import jax  # pylint: disable=g-import-not-at-top
  from raptr_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from raptr_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  from raptr_jax.config import validate  # pylint: disable=g-import-not-at-top
  checkpoint = HFCheckpoint.open(hf_dir)
  if checkpoint.arch.family != cfg.model.family:
    holders = ", ".join(f"{a.hf_class} -> model.family={a.family}" for a in arch_lib.ARCHITECTURES)
    raise arch_lib.UnsupportedArchitecture(
        f"{hf_dir} is a {checkpoint.arch.hf_class} ({checkpoint.hf_config['model_type']}), which model.family="
        f"{cfg.model.family!r} cannot hold; use a config of the {checkpoint.arch.family!r} family (supported: {holders})")
  checkpoint.require_tokenizer()
  if ckpt_lib.Checkpointer.has_steps(os.path.join(workdir, "checkpoints")) or pretrained.has_import(workdir):
    raise ValueError(f"workdir {workdir} already holds a run or an import; import into a fresh --workdir")
  os.makedirs(workdir, exist_ok=True)
  final = os.path.abspath(os.path.join(workdir, pretrained.IMPORT_DIR))
  tmp = _tmp_dir(final)
  vocab_file = os.path.join("tokenizer", checkpoint.vocab_file)
  model = dict(checkpoint.fields, vocab_multiple=1)
  try:
    os.makedirs(os.path.join(tmp, "tokenizer"))
    for name in checkpoint.tokenizer_files():
      shutil.copy2(os.path.join(hf_dir, name), os.path.join(tmp, "tokenizer", name))
    source = pretrained.Source("import", os.path.abspath(workdir), model, os.path.join(tmp, vocab_file),
                               checkpoint.extra_ids)
    changes = pretrained.apply(cfg, source, sizes=True)
    validate(cfg)
    run = train_lib.setup(cfg, need_costs=False)
    vocab_size = _vocab_size(cfg)
    if vocab_size > run.model_cfg.vocab_size:
      raise CheckpointFormatError(f"{hf_dir}: the tokenizer has {vocab_size} ids but the model's embedding only "
                                  f"{run.model_cfg.vocab_size} rows (config.json vocab_size); they are not one model's")
    params = place_params(run.abstract_state.params, run.model_cfg, checkpoint)
    _save_params(os.path.join(tmp, "params"), params)
    record = {"source": os.path.abspath(hf_dir), "hf_class": checkpoint.arch.hf_class,
              "model_type": checkpoint.hf_config["model_type"], "model": model,
              "data": {"vocab_file": vocab_file, "extra_ids": checkpoint.extra_ids},
              "parameters": int(sum(x.size for x in jax.tree.leaves(params))),
              "imported": datetime.datetime.now().isoformat(timespec="seconds"), "hf_config": checkpoint.hf_config}
    with open(os.path.join(tmp, pretrained.IMPORT_META), "w") as f:
      json.dump(record, f, indent=1)
    os.replace(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  cfg.data.vocab_path = os.path.join(final, vocab_file)
  _write_config(workdir, cfg)
  log(f"imported {checkpoint.arch.hf_class} from {hf_dir} ({record['parameters'] / 1e6:.2f}M parameters) into {final}")
  for key, (was, now) in changes.items():
    log(f"  {key}: {was!r} -> {now.replace(tmp, final) if isinstance(now, str) else now!r}")
  return record


def _save_params(path: str, params) -> None:
  """Saves the placed parameters as an orbax checkpoint (what ``StandardCheckpointer`` writes),
  synchronously and with at most the largest array's bytes copied to the host at a time: orbax's
  default lets every array's host copy be in flight at once, which holds the model twice."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  largest = max(sum(s.data.nbytes for s in x.addressable_shards) for x in jax.tree.leaves(params))
  handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=(largest + 2**20) / 1e9)
  with ocp.Checkpointer(handler) as saver:
    saver.save(path, args=ocp.args.PyTreeSave(params))


def _vocab_size(cfg) -> int:
  from raptr_jax.data.vocab import load_vocabulary  # pylint: disable=g-import-not-at-top
  return load_vocabulary(cfg.data.vocab_path, cfg.data.extra_ids).vocab_size


def _write_config(workdir: str, cfg) -> None:
  tmp = os.path.join(workdir, "config.json.tmp")
  with open(tmp, "w") as f:
    json.dump(cfg.to_dict(), f, indent=2, sort_keys=True, default=str)
    f.write("\n")
  os.replace(tmp, os.path.join(workdir, "config.json"))


def export_checkpoint(workdir: str, output: str, step: int | None = None, dtype: str = "float32",
                      log=print) -> dict:
  """Writes the model of ``workdir``'s checkpoint (the newest, or ``step``; a workdir holding
  only an import: the imported model) to ``output`` as a transformers directory; returns its
  config.json."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from raptr_jax.data.vocab import load_vocabulary  # pylint: disable=g-import-not-at-top
  from raptr_jax.evaluate import restore  # pylint: disable=g-import-not-at-top
  from raptr_jax.step import view_params  # pylint: disable=g-import-not-at-top
  from raptr_jax.workdir import config_from_workdir  # pylint: disable=g-import-not-at-top
  if dtype not in DTYPES:
    raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  if os.path.exists(output) and os.listdir(output):
    raise ValueError(f"--output={output} exists and is not empty; export into a new folder")
  cfg = config_from_workdir(workdir)
  arch = arch_lib.for_family(cfg.model.family)
  run, step, params, meta = restore(cfg, workdir, step)
  cfg = run.cfg
  model_cfg, notes = run.model_cfg, []
  stage = run.plan.stages[min(int(meta.get("stage", 0)), len(run.plan.stages) - 1)]
  if stage.view:  # stacking / growth before its last growth: the model this stage trains
    model_cfg = dataclasses.replace(model_cfg, **stage.view)
    params = view_params(params, run.steps.ctx.view(stage.view)[1])
    notes.append(f"step {step} lies in stage {stage.name}: its model ({stage.view}) is exported")
  if "aux_heads" in params:
    params = {k: v for k, v in params.items() if k != "aux_heads"}
    model_cfg = dataclasses.replace(model_cfg, aux_heads=0)
    notes.append("interlocking backprop's auxiliary heads are left out (training-time only)")
  if cfg.data.objective == "ul2":
    notes.append("UL2's prefix-LM reading (a bidirectional [S2S] prefix) has no LlamaForCausalLM equivalent: "
                 "transformers runs the model causally")
  hf_config = arch.config(model_cfg)
  vocab = load_vocabulary(cfg.data.vocab_path, cfg.data.extra_ids)
  hf_config |= {"bos_token_id": vocab.bos_id, "eos_token_id": vocab.eos_id, "pad_token_id": vocab.pad_id,
                "dtype": dtype, "torch_dtype": dtype}
  output = os.path.abspath(output)
  tmp = _tmp_dir(output)
  try:
    np_dtype = np.dtype("bfloat16") if dtype == "bfloat16" else DTYPES[dtype]
    files = write_safetensors(tmp, hf_tensors(params, model_cfg, cfg.model.family, np_dtype),
                              metadata={"exported_from": os.path.abspath(workdir), "step": str(step)})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
    files += ["config.json"] + _write_tokenizer(tmp, cfg, vocab, hf_config)
    if os.path.exists(output):
      os.rmdir(output)
    os.replace(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  log(f"exported {arch.hf_class} of {workdir} at step {step} to {output}: {', '.join(files)}")
  for note in notes:
    log(f"  note: {note}")
  log(f"  load it with transformers.{arch.auto_class}.from_pretrained({output!r})")
  return hf_config


def _write_tokenizer(directory: str, cfg, vocab, hf_config) -> list[str]:
  """The run's tokenizer files. A transformers tokenizer the run took over (an import's, or
  init.source's) is copied; a SentencePiece model without a ``tokenizer.json`` beside it (this
  project's, or a checkpoint that shipped only its .model) also gets a ``tokenizer.json`` that
  tokenizes exactly as SentencePiece does (``hf/tokenizer.py``), which transformers loads."""
  from raptr_jax.hf.convert import TOKENIZER_FILES, VOCAB_FILES  # pylint: disable=g-import-not-at-top
  path, written = vocab.model_path, []
  folder = os.path.dirname(path)
  if os.path.basename(path) in VOCAB_FILES and os.path.exists(os.path.join(folder, "..", IMPORT_MARK)) or \
      os.path.exists(os.path.join(folder, "tokenizer_config.json")):
    for name in TOKENIZER_FILES:
      if os.path.exists(os.path.join(folder, name)):
        shutil.copy2(os.path.join(folder, name), os.path.join(directory, name))
        written.append(name)
  if path.endswith(".model") and "tokenizer.json" not in written:
    from raptr_jax.hf.tokenizer import write_tokenizer_files  # pylint: disable=g-import-not-at-top
    special = {"pad": vocab.pad_id, "eos": vocab.eos_id, "unk": vocab.unk_id, "bos": vocab.bos_id}
    written = sorted(set(written) | {os.path.basename(f) for f in write_tokenizer_files(directory, path, vocab.extra_ids, special)})
    if cfg.model.family == "t5":  # T5's tokenizer ends every text with eos (transformers' T5Tokenizer does)
      from tokenizers import Tokenizer, processors  # pylint: disable=g-import-not-at-top
      file = os.path.join(directory, "tokenizer.json")
      tokenizer = Tokenizer.from_file(file)
      eos = tokenizer.id_to_token(vocab.eos_id)
      tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                                               special_tokens=[(eos, vocab.eos_id)])
      tokenizer.save(file)
  return written
