"""Every benchmark of ``bench/`` in one bounded command: the figures a lent accelerator should record.

    python bench/run_all.py --time_budget_s=480                 # whatever devices it finds
    python bench/run_all.py --time_budget_s=120 --only=step_decoder,subnetwork_depth
    python bench/run_all.py --list                              # the entries, their order and estimates

On an accelerator each entry runs at its accelerator size (the decoder, BERT and T5 train-step
MFU; RaPTr depth / width / PLD, stacking and random-LTD realized against analytic; batch
selection; interlocking modes; scoring and generation throughput; the framework tax); on a CPU
the tiny presets of the same scripts, under the same budget logic. Entries run most important
first, each in its own process (a crash or an out-of-memory costs that entry only) with a
timeout of the budget left, and an entry whose estimated time (compilation included: the
estimates below were measured, and ``--estimates=REPORT.json`` takes a previous report's
measured times instead) does not fit in what is left is skipped with the reason.

Writes one JSON report (``--json``, default ``bench/run_all.json``: the environment, each
entry's command, status, wall time and figures) and the markdown rows for ``bench/README.md``
(``--markdown``, default printed), so recording an accelerator's figures is one command and one
commit.
"""
import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import report  # noqa: E402  (bench/ is not a package)


@dataclasses.dataclass(frozen=True)
class Entry:
  name: str
  what: str
  accelerator: tuple[str, ...]   # script and arguments at the accelerator size
  cpu: tuple[str, ...]           # the same at the CPU smoke size
  estimate_s: tuple[float, float]  # (accelerator, CPU) seconds, compilation and start-up included
  summary: str                   # how its figures read in a markdown row (see ``summarize``)


TINY_DEPTH = ("--preset=tiny", "--set", "model.num_layers=6", "--steps=3", "--rounds=2", "--warmup=1")
FAST = ("--steps=5", "--rounds=2")  # accelerator timings: 2 interleaved rounds of 5 steps a variant
ENTRIES = (
    Entry("step_decoder", "decoder train step (~370M, seq 1024, batch 16, bf16): MFU",
          ("bench_step.py",), ("bench_step.py", "--preset=tiny", "--steps=5", "--warmup=1"), (90, 25), "step"),
    Entry("subnetwork_depth", "RaPTr depth k = L/2, 2L/3: realized vs analytic",
          ("bench_subnetwork.py",) + FAST, ("bench_subnetwork.py",) + TINY_DEPTH, (150, 45), "subnetwork"),
    Entry("step_bert", "crammed BERT train step (batch 256 x 128): MFU",
          ("bench_step.py", "--preset=bert_base"), ("bench_step.py", "--preset=bert_tiny", "--steps=3", "--warmup=1"),
          (80, 25), "step"),
    Entry("step_t5", "T5 v1.1-base train step (512 -> 114, batch 48): MFU",
          ("bench_step.py", "--preset=t5_base"), ("bench_step.py", "--preset=t5_tiny", "--steps=3", "--warmup=1"),
          (100, 30), "step"),
    Entry("random_ltd", "random-LTD kept lengths S/8 .. S/2: realized vs analytic",
          ("bench_subnetwork.py", "--random_ltd", "--fractions=0.5") + FAST,
          ("bench_subnetwork.py", "--random_ltd", "--fractions=0.5") + TINY_DEPTH, (220, 70), "subnetwork"),
    Entry("stacking", "stacking depths L/4, L/2: realized vs analytic",
          ("bench_subnetwork.py", "--stacking", "--fractions=0.5") + FAST,
          ("bench_subnetwork.py", "--stacking", "--fractions=0.5") + TINY_DEPTH, (160, 50), "subnetwork"),
    Entry("subnetwork_width_pld", "RaPTr heads / MLP at half width, PLD at 0.9: realized vs analytic",
          ("bench_subnetwork.py", "--width", "--pld=0.9", "--fractions=0.5") + FAST,
          ("bench_subnetwork.py", "--width", "--pld=0.9", "--fractions=0.5") + TINY_DEPTH, (220, 70), "subnetwork"),
    Entry("batch_selection", "selective backprop / RHO loss step vs baseline (crammed BERT)",
          ("bench_selection.py", "--preset=bert_base") + FAST,
          ("bench_selection.py", "--preset=bert_tiny", "--steps=3", "--rounds=1"), (100, 40), "selection"),
    Entry("interlocking", "interlocking backprop modes, 4 components (1 device, K devices modelled)",
          ("bench_interlocking.py",) + FAST,
          ("bench_interlocking.py", "--preset=tiny", "--set", "model.num_layers=4", "--steps=2", "--rounds=1"),
          (220, 80), "interlocking"),
    Entry("scoring", "downstream scoring pairs/s and KV-cache generation tokens/s (default decoder)",
          ("bench_scoring.py",), ("bench_scoring.py", "--config=configs/ul2.py:tiny", "--pairs=128", "--rounds=1"),
          (60, 40), "scoring"),
    Entry("framework_tax", "the project's step vs a plain-JAX step (full, RaPTr, random-LTD)",
          ("framework_tax.py", "--rounds=5", "--steps=5"),
          ("framework_tax.py", "--preset=tiny", "--rounds=3", "--steps=3"), (120, 60), "tax"),
)


def summarize(kind: str, figures: dict) -> str:
  """One line of an entry's figures for the markdown row."""
  pct = lambda x: "n/a" if x is None else f"{x:.1%}"
  if kind == "step":
    return (f"step {figures['step_ms']:.1f} ms, {figures['tokens_per_s']:,.0f} tokens/s, "
            f"MFU {pct(figures['mfu'])} (compile {figures['compile_s']:.0f} s)")
  if kind == "subnetwork":
    return "; ".join(f"{r['variant']}: {r['realized']:.3f} vs {r['analytic']:.3f}" for r in figures["rows"][1:])
  if kind == "selection":
    return "; ".join(f"{r['variant']}: {r['x_baseline']:.2f}x" for r in figures["rows"]) + \
        f"; RHO 2x: {figures['rho_x_baseline']:.2f}x"
  if kind == "interlocking":
    return "; ".join(f"{r['mode']}: {r['x_baseline']:.2f}x baseline"
                     + (f", K devices {r['x_end_to_end']:.2f}x end-to-end" if r["x_end_to_end"] else "")
                     for r in figures["rows"])
  if kind == "scoring":
    out = f"{figures['pairs_per_s']:,.0f} pairs/s"
    if "generation_tokens_per_s" in figures:
      out += f", generation {figures['generation_tokens_per_s']:,.0f} tokens/s"
    return out
  if kind == "tax":
    return "; ".join(f"{r['variant']}: {r['ratio']:.3f}" for r in figures["rows"])
  raise ValueError(kind)


def accelerator_present() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.devices()[0].platform != "cpu"


def estimates_from(path: str) -> dict:
  """{entry: measured seconds} of a previous report (``--estimates``)."""
  if not path:
    return {}
  with open(path) as f:
    return {e["name"]: e["wall_s"] for e in json.load(f)["entries"] if e["status"] == "ok"}


def run_entry(entry: Entry, argv: tuple[str, ...], timeout_s: float) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "figures.json")
    command = [sys.executable, os.path.join(HERE, argv[0]), *argv[1:], f"--json={out}"]
    start = time.perf_counter()
    try:
      done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                            env=os.environ | {"PYTHONPATH": os.pathsep.join([HERE, ROOT])})
    except subprocess.TimeoutExpired:
      return {"status": "timed out", "reason": f"killed at the budget left ({timeout_s:.0f} s)",
              "wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    if done.returncode != 0 or not os.path.exists(out):
      tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
      return {"status": "failed", "reason": f"exit code {done.returncode}: " + " | ".join(tail), "wall_s": wall}
    with open(out) as f:
      record = json.load(f)
  return {"status": "ok", "wall_s": wall, "figures": record["figures"], "environment": record["environment"],
          "summary": summarize(entry.summary, record["figures"])}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--time_budget_s", type=float, default=480.0)
  parser.add_argument("--only", default="", help="comma-separated entry names (default: all, in order)")
  parser.add_argument("--size", default="auto", choices=["auto", "accelerator", "cpu"],
                      help="auto: accelerator sizes when an accelerator is present, else the CPU presets")
  parser.add_argument("--estimates", default="", help="a previous report whose measured times to budget with")
  parser.add_argument("--json", default=os.path.join(HERE, "run_all.json"))
  parser.add_argument("--markdown", default="", help="write the markdown rows here (default: print them)")
  parser.add_argument("--list", action="store_true", help="list the entries and exit")
  args = parser.parse_args(argv)
  names = [e.name for e in ENTRIES]
  only = [n for n in args.only.split(",") if n]
  unknown = sorted(set(only) - set(names))
  if unknown:
    parser.error(f"unknown entries {unknown}; the entries are {names}")
  if not args.time_budget_s > 0:
    parser.error(f"--time_budget_s must be positive, got {args.time_budget_s:g}")
  large = accelerator_present() if args.size == "auto" else args.size == "accelerator"
  measured = estimates_from(args.estimates)
  entries = [e for e in ENTRIES if not only or e.name in only]
  if args.list:
    for e in entries:
      print(f"{e.name:22s} ~{e.estimate_s[0 if large else 1]:4.0f} s  {e.what}")
    return {}
  env = report.environment()
  start = time.perf_counter()
  deadline = start + args.time_budget_s
  results = []
  print(f"{env['devices']} x {env['device']} ({env['platform']}), jax {env['jax']}: "
        f"{'accelerator' if large else 'CPU'} sizes, budget {args.time_budget_s:.0f} s", flush=True)
  for entry in entries:
    argv = entry.accelerator if large else entry.cpu
    estimate = measured.get(entry.name, entry.estimate_s[0 if large else 1])
    left = deadline - time.perf_counter()
    row = {"name": entry.name, "what": entry.what, "command": "python bench/" + " ".join(argv),
           "estimate_s": estimate}
    if estimate > left:
      row |= {"status": "skipped", "reason": f"estimated {estimate:.0f} s, {max(left, 0):.0f} s of the budget left"}
    else:
      row |= run_entry(entry, argv, max(1.0, left))
    results.append(row)
    print(f"  {entry.name:22s} {row['status']:9s} {row.get('wall_s', 0):6.1f} s  "
          f"{row.get('summary') or row.get('reason', '')}", flush=True)
  total = time.perf_counter() - start
  full = {"date": datetime.date.today().isoformat(), "environment": env, "time_budget_s": args.time_budget_s,
          "wall_s": total, "size": "accelerator" if large else "cpu", "entries": results}
  if args.json:
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
      json.dump(full, f, indent=1, default=float)
    os.replace(tmp, args.json)
  rows = markdown_rows(full)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(rows)
  print(f"\n{total:.0f} s of {args.time_budget_s:.0f} s; report: {args.json}\n\n{rows}")
  return full


def markdown_rows(full: dict) -> str:
  env = full["environment"]
  device = f"{env['devices']} x {env['device']}"
  lines = ["| date | device | jax | benchmark | command | figures |", "|---|---|---|---|---|---|"]
  for e in full["entries"]:
    figures = e.get("summary") or f"{e['status']}: {e.get('reason', '')}"
    lines.append(f"| {full['date']} | {device} | {env['jax']} | {e['name']} | `{e['command']}` | {figures} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
