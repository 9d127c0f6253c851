"""Peak host memory of ``python -m raptr_jax.hf import`` on random Llama-architecture checkpoints.

    python bench/bench_hf_import.py                      # ~350M and ~1B parameters, bfloat16 files
    python bench/bench_hf_import.py --sizes=350m --dtype=float32

Writes a random checkpoint (transformers' layout: config.json, model.safetensors, the built-in
SentencePiece model as tokenizer.model), imports it in a fresh process (float32 parameters, one
CPU device, so the device's copy of the model is host memory too) and reports that process's peak
resident memory (``ru_maxrss``) against the parameters' own float32 size and the largest single
tensor. Reading is tensor by tensor from the memory-mapped file, so the peak should be the model
held once plus about one tensor, not the model twice.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes  # noqa: F401
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {  # Llama-architecture shapes (vocab 32000, SwiGLU)
    "350m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16),
}


def write_random(directory: str, size: str, dtype: str) -> tuple[int, int]:
  """A random checkpoint; returns (parameters, bytes of the largest tensor in float32)."""
  from safetensors.numpy import save_file
  shapes = SIZES[size]
  d, f, n_layers = shapes["hidden_size"], shapes["intermediate_size"], shapes["num_hidden_layers"]
  config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_act": "silu",
            "num_key_value_heads": shapes["num_attention_heads"], "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "max_position_embeddings": 2048, **shapes}
  rng = np.random.default_rng(0)
  tensors = {"model.embed_tokens.weight": (32000, d), "model.norm.weight": (d,), "lm_head.weight": (32000, d)}
  for i in range(n_layers):
    p = f"model.layers.{i}."
    tensors |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (d, d),
                p + "self_attn.v_proj.weight": (d, d), p + "self_attn.o_proj.weight": (d, d),
                p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f)}
  arrays = {k: (rng.standard_normal(s, np.float32) * 0.02).astype(dtype) for k, s in tensors.items()}
  save_file(arrays, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(directory, "config.json"), "w") as fh:
    json.dump(config, fh)
  shutil.copy(os.path.join(ROOT, "raptr_jax", "data", "builtin", "shakespeare_spm.model"),
              os.path.join(directory, "tokenizer.model"))
  count = sum(int(np.prod(s)) for s in tensors.values())
  largest = max(int(np.prod(s)) for s in tensors.values()) * 4
  return count, largest


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", default="350m,1b")
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  args = parser.parse_args()
  rows = []
  for size in args.sizes.split(","):
    with tempfile.TemporaryDirectory() as tmp:
      hf_dir, workdir = os.path.join(tmp, "hf"), os.path.join(tmp, "run")
      os.makedirs(hf_dir)
      count, largest = write_random(hf_dir, size, args.dtype)
      file_bytes = os.path.getsize(os.path.join(hf_dir, "model.safetensors"))
      command = [sys.executable, "-m", "raptr_jax.hf", "import", f"--config={ROOT}/configs/gpt.py",
                 f"--hf_dir={hf_dir}", f"--workdir={workdir}", "model.dtype=float32"]
      start = time.perf_counter()
      before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
      subprocess.run(command, check=True, env=os.environ | {"JAX_PLATFORMS": "cpu"}, stdout=subprocess.DEVNULL)
      peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB -> bytes (Linux)
      assert peak > before * 1024, "a smaller child's peak would hide this one's: run one size per process"
      seconds = time.perf_counter() - start
      rows.append(dict(size=size, parameters=count, file_gib=file_bytes / 2**30, model_f32_gib=count * 4 / 2**30,
                       largest_tensor_gib=largest / 2**30, peak_rss_gib=peak / 2**30, seconds=seconds))
      print(json.dumps(rows[-1]))
  print("\n| checkpoint | parameters | file | model (float32) | largest tensor | peak host memory | time |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| Llama {r['size']} ({args.dtype}) | {r['parameters'] / 1e6:.0f}M | {r['file_gib']:.2f} GiB | "
          f"{r['model_f32_gib']:.2f} GiB | {r['largest_tensor_gib']:.2f} GiB | {r['peak_rss_gib']:.2f} GiB | "
          f"{r['seconds']:.0f} s |")


if __name__ == "__main__":
  main()
