"""Peak host memory of ``python -m raptr_jax.hf import`` on random Llama-architecture checkpoints.

    python bench/bench_hf_import.py                      # ~350M and ~1B parameters, bfloat16 files
    python bench/bench_hf_import.py --sizes=350m --dtype=float32

Writes a random checkpoint (transformers' layout: config.json, model.safetensors, the built-in
SentencePiece model as tokenizer.model), imports it in a fresh process (float32 parameters, one
CPU device, so the device's copy of the model is host memory too) and samples that process's
resident memory: anonymous (what the import allocated) and file-backed (pages of the
memory-mapped safetensors file, page cache the kernel can reclaim), against the parameters' own
float32 size and our largest parameter. Reading is tensor by tensor and the orbax save copies at
most one array to the host at a time, so the allocated peak should be the model once plus about
one parameter, not the model twice.
"""
import argparse
import json
import os
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
  """A random checkpoint; returns (parameters, float32 bytes of our largest parameter: a stacked
  MLP matrix of every layer, or the embedding)."""
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
  stacked = max(n_layers * f * d, 32000 * d) * 4
  return count, stacked


def run_sampled(command) -> dict:
  """Runs ``command`` and returns its peak resident bytes: anonymous (what it allocated), file-backed
  (pages of the memory-mapped weights: page cache the kernel reclaims) and their joint peak."""
  child = subprocess.Popen(command, env=os.environ | {"JAX_PLATFORMS": "cpu"}, stdout=subprocess.DEVNULL)
  peaks = {"peak_anon_gib": 0, "peak_file_gib": 0, "peak_rss_gib": 0}
  while child.poll() is None:
    try:
      with open(f"/proc/{child.pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
      break
    kib = {k: int(fields.get(k, "0 kB").split()[0]) * 1024 for k in ("RssAnon", "RssFile", "VmHWM")}
    peaks["peak_anon_gib"] = max(peaks["peak_anon_gib"], kib["RssAnon"])
    peaks["peak_file_gib"] = max(peaks["peak_file_gib"], kib["RssFile"])
    peaks["peak_rss_gib"] = max(peaks["peak_rss_gib"], kib["VmHWM"])
    time.sleep(0.01)
  if child.wait() != 0:
    raise SystemExit(f"the import failed: {' '.join(command)}")
  return peaks


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
      count, stacked = write_random(hf_dir, size, args.dtype)
      file_bytes = os.path.getsize(os.path.join(hf_dir, "model.safetensors"))
      command = [sys.executable, "-m", "raptr_jax.hf", "import", f"--config={ROOT}/configs/gpt.py",
                 f"--hf_dir={hf_dir}", f"--workdir={workdir}", "model.dtype=float32"]
      start = time.perf_counter()
      peaks = run_sampled(command)
      seconds = time.perf_counter() - start
      rows.append(dict(size=size, parameters=count, file_gib=file_bytes / 2**30, model_f32_gib=count * 4 / 2**30,
                       largest_stacked_gib=stacked / 2**30, **{k: v / 2**30 for k, v in peaks.items()},
                       seconds=seconds))
      print(json.dumps(rows[-1]))
  print("\n| checkpoint | parameters | file | model (float32) | largest stacked parameter | peak allocated "
        "(anonymous) | peak mapped file pages | peak resident (ru_maxrss) | time |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| Llama {r['size']} ({args.dtype}) | {r['parameters'] / 1e6:.0f}M | {r['file_gib']:.2f} GiB | "
          f"{r['model_f32_gib']:.2f} GiB | {r['largest_stacked_gib']:.2f} GiB | {r['peak_anon_gib']:.2f} GiB | "
          f"{r['peak_file_gib']:.2f} GiB | {r['peak_rss_gib']:.2f} GiB | {r['seconds']:.0f} s |")


if __name__ == "__main__":
  main()
