"""transformers checkpoints to and from this project's models (no torch or transformers needed).

* ``HFCheckpoint.open(directory)``: a transformers checkpoint directory: its ``config.json``
  mapped to our ``model`` fields (``architectures.py``), its tensors (``tensors.py``, read one at
  a time) and its tokenizer file.
* ``place_params(abstract, model_cfg, checkpoint)``: our parameter tree straight onto the mesh:
  every array is made by ``jax.make_array_from_callback`` with its sharding, each device's shard
  filled from the transformers tensors it covers (one layer's tensor read, re-laid out and sliced
  at a time), so a host holds about one tensor plus its own shards, never the model twice.
  Missing tensors, shapes that do not match the config and non-finite values are refused naming
  the tensor.
* ``hf_tensors(params, model_cfg)``: the transformers tensors of our parameters (export).
"""
import ctypes
import ctypes.util
import dataclasses
import json
import os

import jax
import numpy as np

from raptr_jax.data.vocab import CONFIG_FILES, VOCAB_FILES
from raptr_jax.hf import architectures as arch_lib
from raptr_jax.hf.tensors import CheckpointFormatError, CheckpointTensors

# Tokenizer files copied with a checkpoint; the first of VOCAB_FILES present becomes the vocabulary.
TOKENIZER_FILES = VOCAB_FILES + CONFIG_FILES + ("added_tokens.json",)


@dataclasses.dataclass
class HFCheckpoint:
  directory: str
  hf_config: dict
  arch: arch_lib.Architecture
  fields: dict            # our model section (family included)
  tensors: CheckpointTensors
  vocab_file: str | None  # the tokenizer file that becomes data.vocab_path (None: none found)
  extra_ids: int          # T5 sentinels appended to a SentencePiece vocabulary

  @staticmethod
  def open(directory: str) -> "HFCheckpoint":
    path = os.path.join(directory, "config.json")
    if not os.path.isdir(directory):
      raise CheckpointFormatError(f"--hf_dir={directory!r} is not a directory")
    if not os.path.exists(path):
      raise CheckpointFormatError(f"{directory} has no config.json: give the folder a transformers model was saved "
                                  "to (model.save_pretrained(dir) writes config.json and the weights)")
    try:
      with open(path) as f:
        hf = json.load(f)
    except ValueError as e:
      raise CheckpointFormatError(f"{path} is not valid JSON ({e}); copy it again") from None
    if "model_type" not in hf:
      raise CheckpointFormatError(f"{path} has no model_type; it is not a transformers model config")
    arch = arch_lib.for_model_type(hf["model_type"])
    tensors = CheckpointTensors(directory)
    try:
      fields = arch.fields(hf, set(tensors.names()))
    except KeyError as e:
      raise CheckpointFormatError(f"{path} lacks the field {e.args[0]!r} that {arch.hf_class} needs") from None
    vocab_file = next((f for f in VOCAB_FILES if os.path.exists(os.path.join(directory, f))), None)
    return HFCheckpoint(directory, hf, arch, fields, tensors, vocab_file, _extra_ids(directory, hf, vocab_file))

  def require_tokenizer(self):
    if self.vocab_file is None:
      raise CheckpointFormatError(
          f"{self.directory} has no tokenizer ({', '.join(VOCAB_FILES)}): the imported model must see the ids it "
          "was trained on; copy the tokenizer files of the checkpoint into that folder "
          "(tokenizer.save_pretrained(dir))")

  def tokenizer_files(self) -> list[str]:
    return [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(self.directory, f))]


def _extra_ids(directory: str, hf: dict, vocab_file: str | None) -> int:
  """Sentinels a SentencePiece vocabulary gets appended (T5: 100); 0 for the others, whose
  tokenizer files carry their own special tokens."""
  if vocab_file is None or not vocab_file.endswith(".model"):
    return 0
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      with open(path) as f:
        conf = json.load(f)
      if "extra_ids" in conf:
        return int(conf["extra_ids"])
      extra = [t for t in conf.get("additional_special_tokens") or [] if "extra_id_" in str(t)]
      if extra:
        return len(extra)
  return 100 if hf.get("model_type") in ("t5", "mt5") else 0


def _layers_of(model_cfg, stack: str) -> int:
  return model_cfg.decoder_layers if stack == "decoder_layers" else model_cfg.num_layers


def tensor_plan(model_cfg, checkpoint: HFCheckpoint, abstract) -> dict:
  """{our path: (Tensor, our shape)}, checked against the checkpoint: every tensor present
  (or optional) with the shape the config implies. Errors name the tensor and the config field."""
  plan, problems = {}, []
  names = set(checkpoint.tensors.names())
  flat = {tuple(getattr(k, "key", k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  for t in checkpoint.arch.tensors(model_cfg):
    if t.export_only:
      continue
    if t.path not in flat:
      problems.append(f"our model has no parameter {'/'.join(t.path)} for {t.name}")
      continue
    shape = tuple(flat[t.path].shape)
    per_layer = shape[1:] if t.stacked else shape
    want = t.hf_shape(per_layer)
    for name in ([t.name.format(i=i) for i in range(shape[0])] if t.stacked else [t.name]):
      name = _present_name(name, names)
      if name is None:
        if not t.optional:
          problems.append(f"missing tensor {t.name.format(i='N') if t.stacked else t.name}")
        break
      have = checkpoint.tensors.shape(name)
      if have != want:
        problems.append(f"{name} has shape {have}, the config implies {want}")
        break
    plan[t.path] = (t, shape)
  missing = sorted(set(flat) - set(plan))
  if missing:
    problems.append(f"no tensor for our parameter(s) {', '.join('/'.join(p) for p in missing[:5])}")
  if problems:
    raise CheckpointFormatError(f"{checkpoint.directory} does not match its config.json as {checkpoint.arch.hf_class}: "
                                + "; ".join(problems[:6]) + ("; ..." if len(problems) > 6 else "")
                                + ". The weight files and config.json must come from the same model")
  return plan


def _present_name(name: str, names) -> str | None:
  if name in names:
    return name
  for new, old in arch_lib.LEGACY_NAMES:
    if name.endswith(new) and name[:-len(new)] + old in names:
      return name[:-len(new)] + old
  return None


class _Reader:
  """Reads each transformers tensor once per callback, checks it is finite (once per name),
  and re-lays it out as ours."""

  def __init__(self, checkpoint: HFCheckpoint):
    self.tensors = checkpoint.tensors
    self.names = set(self.tensors.names())
    self.checked = set()

  def layer(self, t, name: str, shape) -> np.ndarray:
    name = _present_name(name, self.names)
    x = self.tensors.read(name)
    if name not in self.checked:
      if not np.isfinite(x.astype(np.float32) if x.dtype.itemsize < 4 else x).all():
        raise CheckpointFormatError(f"{self.tensors.directory}: tensor {name} holds NaN or infinite values; the "
                                    "checkpoint is damaged or was saved from a diverged run")
      self.checked.add(name)
    return t.to_ours(x, shape)


def place_params(abstract, model_cfg, checkpoint: HFCheckpoint):
  """Our parameter tree (``abstract``: ShapeDtypeStructs with shardings) filled from the
  checkpoint, each device's shard made from the tensors it covers."""
  plan = tensor_plan(model_cfg, checkpoint, abstract)
  reader = _Reader(checkpoint)

  def make(path, leaf):
    key = tuple(getattr(k, "key", k) for k in path)
    t, shape = plan[key]
    dtype = leaf.dtype

    def shard(index):
      if not t.stacked:
        return np.asarray(reader.layer(t, t.name, shape)[index], dtype)
      layers = range(shape[0])[index[0]]
      out = None
      for row, i in enumerate(layers):  # filled layer by layer: one transformers tensor at a time
        part = reader.layer(t, t.name.format(i=i), shape[1:])[index[1:]]
        if out is None:
          out = np.empty((len(layers),) + part.shape, dtype)
        out[row] = part
      return out

    array = jax.make_array_from_callback(shape, leaf.sharding, shard).block_until_ready()
    _release_freed_memory()
    return array

  return jax.tree_util.tree_map_with_path(make, abstract)


def _release_freed_memory():
  """Hands the reading's freed temporaries back to the OS (glibc keeps freed heap chunks in its
  arenas: without this a 350M import held 0.5 GiB more than the model at its peak)."""
  if _LIBC is not None:
    _LIBC.malloc_trim(0)


def _glibc():
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc if hasattr(libc, "malloc_trim") else None
  except OSError:  # not glibc (macOS, musl): nothing to trim
    return None


_LIBC = _glibc()


def hf_tensors(params, model_cfg, family: str, dtype=np.float32) -> dict:
  """{transformers name: numpy array} of our parameters (full arrays, fetched one at a time)."""
  arch = arch_lib.for_family(family)
  flat = {tuple(getattr(k, "key", k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  out = {}
  for t in arch.tensors(model_cfg):
    value = np.asarray(jax.device_get(flat[t.path]))
    if t.stacked:
      for i in range(value.shape[0]):
        out[t.name.format(i=i)] = np.ascontiguousarray(t.to_hf(value[i]).astype(dtype))
    else:
      out[t.name] = np.ascontiguousarray(t.to_hf(value).astype(dtype))
  return out
