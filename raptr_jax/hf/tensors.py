"""Reading and writing the tensors of a transformers checkpoint directory, one tensor at a time.

``CheckpointTensors(directory)`` opens what ``save_pretrained`` writes: ``model.safetensors``,
sharded ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``, or the older
``pytorch_model.bin`` (and its sharded index). Safetensors files are memory-mapped and read
tensor by tensor (``safetensors.safe_open``), so importing a model needs host memory of about one
tensor at a time. ``.bin`` files are pickles: they are read only through
``torch.load(weights_only=True)`` (tensors, never code), and only when torch is installed.

``write_safetensors(directory, tensors)`` writes ``model.safetensors`` (or shards of at most
``max_shard_bytes`` with their index, as transformers does).
"""
import json
import os

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors can hand it over)
import numpy as np

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
# Numeric dtypes a parameter can be read from (cast to the run's param_dtype).
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


class CheckpointFormatError(ValueError):
  """The directory is not a readable transformers checkpoint (names the file and the fix)."""


class CheckpointTensors:
  """Name -> tensor access over the weight files of one checkpoint directory."""

  def __init__(self, directory: str):
    self.directory = directory
    if not os.path.isdir(directory):
      raise CheckpointFormatError(f"{directory!r} is not a directory; give the folder a transformers model was "
                                  "saved to (save_pretrained), with config.json and the weight files")
    self._files: dict[str, str] = {}     # tensor name -> file
    self._handles = {}
    self._torch_tensors: dict[str, dict] = {}
    index = self._first(SAFETENSORS_INDEX, TORCH_BIN_INDEX)
    if index is not None:
      with open(index) as f:
        try:
          weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError) as e:
          raise CheckpointFormatError(f"{index}: not a transformers shard index ({e}); re-save the model") from None
      missing = sorted({v for v in weight_map.values() if not os.path.exists(os.path.join(directory, v))})
      if missing:
        raise CheckpointFormatError(f"{index} names {len(missing)} shard file(s) that are not in {directory}: "
                                    f"{', '.join(missing[:3])}; copy every shard of the checkpoint")
      self._files = {k: os.path.join(directory, v) for k, v in weight_map.items()}
    else:
      single = self._first(SAFETENSORS, TORCH_BIN)
      if single is None:
        found = sorted(os.listdir(directory))
        raise CheckpointFormatError(
            f"{directory} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX} (sharded), {TORCH_BIN} or "
            f"{TORCH_BIN_INDEX} (found: {', '.join(found[:12]) or 'nothing'}); save the model with "
            "save_pretrained, or copy its weight files here")
      for name in self._open(single).keys() if single.endswith(".safetensors") else self._torch(single):
        self._files[name] = single

  def _first(self, *names):
    for name in names:
      path = os.path.join(self.directory, name)
      if os.path.exists(path):
        return path
    return None

  def _open(self, path: str):
    if path not in self._handles:
      from safetensors import safe_open  # pylint: disable=g-import-not-at-top
      try:
        self._handles[path] = safe_open(path, framework="numpy")
      except Exception as e:  # safetensors raises its own error types for a bad header
        raise CheckpointFormatError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:200]}); "
                                    "it may be truncated: copy it again") from None
    return self._handles[path]

  def _torch(self, path: str) -> dict:
    if path not in self._torch_tensors:
      try:
        import torch  # pylint: disable=g-import-not-at-top
      except ImportError:
        raise CheckpointFormatError(
            f"{path} is a PyTorch pickle, which is read only through torch.load(weights_only=True): install torch, "
            "or convert the checkpoint to safetensors (transformers: model.save_pretrained(dir, "
            "safe_serialization=True))") from None
      try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
      except Exception as e:  # pickle errors, a refused object type under weights_only
        raise CheckpointFormatError(f"{path} could not be read as tensors only ({str(e).splitlines()[0][:200]}); "
                                    "convert it to safetensors") from None
      self._torch_tensors[path] = state
    return self._torch_tensors[path]

  def names(self) -> list[str]:
    return sorted(self._files)

  def __contains__(self, name: str) -> bool:
    return name in self._files

  def shape(self, name: str) -> tuple[int, ...]:
    path = self._path(name)
    if path.endswith(".safetensors"):
      return tuple(self._open(path).get_slice(name).get_shape())
    return tuple(self._torch(path)[name].shape)

  def dtype(self, name: str) -> str:
    path = self._path(name)
    if path.endswith(".safetensors"):
      raw = self._open(path).get_slice(name).get_dtype()
      return SAFETENSORS_DTYPES.get(raw, raw.lower())
    return str(self._torch(path)[name].dtype).removeprefix("torch.")

  def read(self, name: str) -> np.ndarray:
    """The tensor ``name`` as a numpy array (bfloat16 through ml_dtypes)."""
    path = self._path(name)
    dtype = self.dtype(name)
    if dtype not in FLOAT_DTYPES:
      raise CheckpointFormatError(f"{path}: tensor {name} has dtype {dtype}, which a parameter cannot be read from "
                                  f"(supported: {', '.join(FLOAT_DTYPES)}); quantized checkpoints must be "
                                  "de-quantized first")
    if path.endswith(".safetensors"):
      return self._open(path).get_tensor(name)
    t = self._torch(path)[name]
    return t.float().numpy() if dtype == "bfloat16" else t.numpy()

  def _path(self, name: str) -> str:
    if name not in self._files:
      raise KeyError(name)
    return self._files[name]


def write_safetensors(directory: str, tensors: dict, max_shard_bytes: int = 5 << 30, metadata=None) -> list[str]:
  """Writes ``tensors`` {name: numpy array} as ``model.safetensors``, or as shards of at most
  ``max_shard_bytes`` with ``model.safetensors.index.json``; returns the files written."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  metadata = {"format": "pt", **(metadata or {})}
  shards, current, size = [], {}, 0
  for name, array in tensors.items():
    if current and size + array.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = np.ascontiguousarray(array)
    size += array.nbytes
  shards.append(current)
  if len(shards) == 1:
    save_file(shards[0], os.path.join(directory, SAFETENSORS), metadata=metadata)
    return [SAFETENSORS]
  files, weight_map = [], {}
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(directory, name), metadata=metadata)
    files.append(name)
    weight_map |= {k: name for k in shard}
  total = sum(a.nbytes for a in tensors.values())
  with open(os.path.join(directory, SAFETENSORS_INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return files + [SAFETENSORS_INDEX]
