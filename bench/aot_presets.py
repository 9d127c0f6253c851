"""Compiles the papers' presets for the TPU slices they fit on and writes the README's table
(``bench/aot_presets.md``, with the JSON reports beside it). CPU only: needs libtpu
(``pip install -e '.[tpu]'``), no TPU.

    python bench/aot_presets.py                   # every preset, ~15 min on 2 cores
    python bench/aot_presets.py --only=ul2,t5     # the rows whose preset contains "ul2" or "t5"
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "aot_presets")

# (preset, what it is, topology, overrides). The presets' data default to the built-in corpus and
# its small vocabulary; each row sets the vocabulary the paper's model had (padded to 128).
BERT_VOCAB, T5_VOCAB, GPT2_VOCAB = "--config.model.vocab_size=30522", "--config.model.vocab_size=32128", \
    "--config.model.vocab_size=50257"
ROWS = [
    ("bert.py:crammed", "NTNG crammed BERT (16 layers, batch 1536 x 128)", "v5e-8",
     ["--config.model.vocab_size=32768", "--config.model.remat=dots"]),
    ("bert.py:raptr_base", "RaPTr BERT-base (batch 256 x 128), RaPTr", "v4-8", [BERT_VOCAB, "--config.method.name=raptr"]),
    ("bert.py:large", "random-LTD BERT-large baseline (batch 1024 x 512)", "v5p-32", [BERT_VOCAB, "--config.model.remat=dots"]),
    ("bert.py:random_ltd_large", "random-LTD BERT-large (kept 128 -> 512)", "v5p-32",
     [BERT_VOCAB, "--config.model.remat=dots"]),
    ("t5.py:base", "NTNG T5 v1.1-base (batch 144, 512 -> 114)", "v4-8", [T5_VOCAB, "--config.model.remat=dots"]),
    ("ul2.py:paper", "RaPTr UL2 1.6B (batch 512 x 512), data parallel", "v5p-128", [T5_VOCAB]),
    ("ul2.py:paper", "RaPTr UL2 1.6B, FSDP", "v5p-128", [T5_VOCAB, "--config.mesh.data=1", "--config.mesh.fsdp=-1"]),
    ("gpt.py:gpt3_350m_random_ltd", "random-LTD GPT-3 350M (batch 256 x 2048)", "v4-32",
     [GPT2_VOCAB, "--config.train.microbatches=4"]),
    ("gpt.py:gpt3_1.3b_random_ltd", "random-LTD GPT-3 1.3B (batch 512 x 2048)", "v5p-64",
     [GPT2_VOCAB, "--config.mesh.data=4", "--config.mesh.fsdp=-1"]),
]


def run_row(i, preset, topology, overrides):
  report = os.path.join(OUT, f"{i:02d}_{preset.replace('.py:', '_')}_{topology}.json")
  if os.path.exists(report):
    os.remove(report)
  cmd = [sys.executable, "-m", "raptr_jax.aot", f"--config=configs/{preset}", f"--topology={topology}",
         f"--report={report}", *overrides]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  print(" ".join(cmd[1:]), "\n", out.stdout, out.stderr[-2000:] if out.returncode else "", flush=True)
  if out.returncode:
    return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
  with open(report) as f:
    return json.load(f)


def table(results) -> str:
  gib = 2 ** 30
  lines = ["| preset | what | parameters | topology | mesh (data x fsdp) | rows / device | state / device | "
           "train step: temporaries | total / device | of HBM | model TFLOP / device / step |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for (preset, what, topology, overrides), r in results:
    if "error" in r:
      lines.append(f"| `{preset}` | {what} | | {topology} | | | | | | | does not compile: {r['error'][:120]} |")
      continue
    train = max((s for s in r["steps"] if s["name"].startswith("train")), key=lambda s: s["total"])
    mesh = r["mesh"]
    state = r["state"]["parameters"] + r["state"]["optimizer state"]
    rows = r.get("rows_per_device", "")
    shown = [o.replace("--config.", "") for o in overrides if "vocab_size" not in o]
    lines.append(f"| `{preset}`{' ' + ' '.join(shown) if shown else ''} "
                 f"| {what} | {r.get('parameters', 0) / 1e6:.0f}M | {topology} | {mesh['data']} x {mesh['fsdp']} | {rows} | {state / gib:.2f} GiB | "
                 f"{train['temporaries'] / gib:.2f} GiB | {train['total'] / gib:.2f} GiB | "
                 f"{100 * train['total'] / r['hbm_bytes']:.0f}% of {r['hbm_bytes'] / gib:.0f} GiB | "
                 f"{train['model_flops'] / 1e12:.1f} |")
  return "\n".join(lines)


def merge(results):
  """Rows measured before (their JSON reports) for the rows not run now (--only)."""
  out = []
  for i, row in enumerate(ROWS):
    done = dict(results).get(i)
    path = os.path.join(OUT, f"{i:02d}_{row[0].replace('.py:', '_')}_{row[2]}.json")
    if done is None and os.path.exists(path):
      with open(path) as f:
        done = json.load(f)
    out.append((row, done or {"error": "not compiled yet"}))
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--only", default="", help="rows whose preset contains one of these (comma-separated)")
  args = parser.parse_args()
  os.makedirs(OUT, exist_ok=True)
  results = merge([(i, run_row(i, row[0], row[2], row[3])) for i, row in enumerate(ROWS) if any(o in row[0] for o in args.only.split(","))])
  import datetime  # pylint: disable=g-import-not-at-top
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  text = (f"Compiled {datetime.date.today()} on CPU by `python bench/aot_presets.py` (jax {metadata.version('jax')}, "
          f"libtpu {metadata.version('libtpu')}); per device; the largest train step of the run's stages.\n\n"
          + table(results))
  with open(os.path.join(ROOT, "bench", "aot_presets.md"), "w") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
