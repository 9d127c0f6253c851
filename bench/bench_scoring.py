"""Throughput of downstream scoring: continuation log-likelihoods per second, and generation.

    python bench/bench_scoring.py                       # the default UL2 decoder (configs/ul2.py)
    python bench/bench_scoring.py --config=configs/t5.py --rows=64
    python bench/bench_scoring.py --config=configs/ul2.py:tiny --pairs=256   # CPU smoke

Random parameters of the config's full model (speed does not depend on them) and HellaSwag-shaped
pairs from the built-in corpus's text: a 40-token context, four 20-token continuations per
question. The first pass compiles every bucket and is not timed; then the median of ``--rounds``
passes over the same pairs: pairs (choices) per second and questions per second, and the
tokens per second of greedy generation with the KV cache (decoders) for ``--gen_tokens`` tokens
of ``--rows`` prompts.
"""
import argparse
import statistics
import time

import jax

import report
from raptr_jax import run as run_lib
from raptr_jax.config import load_config
from raptr_jax.data import corpus
from raptr_jax.downstream.generate import Generator
from raptr_jax.downstream.scoring import Scorer


def pairs_of(n: int) -> list[tuple[str, str]]:
  words = " ".join(d["text"] for d in corpus.read_documents("validation")).split()
  out, i = [], 0
  while len(out) < n:
    context = " ".join(words[i:i + 30])
    for c in range(4):
      out.append((context, " " + " ".join(words[i + 30 + 15 * c:i + 45 + 15 * c])))
    i += 90
  return out[:n]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/ul2.py")
  parser.add_argument("--pairs", type=int, default=1024)
  parser.add_argument("--rows", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--gen_tokens", type=int, default=32)
  parser.add_argument("--json", default="", help="write the figures to this file")
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_args()
  cfg = load_config(args.config, args.overrides)
  run = run_lib.setup(cfg)
  params = run.init().params
  scorer = Scorer(run, params, rows=args.rows, progress=False)
  pairs = pairs_of(args.pairs)
  scorer.score(pairs)  # compiles every bucket
  times = []
  for _ in range(args.rounds):
    t = time.perf_counter()
    scorer.score(pairs)
    times.append(time.perf_counter() - t)
  dt = statistics.median(times)
  print(f"{jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, {args.config} "
        f"({cfg.model.family}, {sum(x.size for x in jax.tree.leaves(run.abstract_state.params)) / 1e6:.1f}M params, "
        f"window {cfg.data.seq_len}), {args.rows} rows a batch:")
  print(f"  scoring: {len(pairs) / dt:,.0f} pairs/s = {len(pairs) / 4 / dt:,.0f} four-choice questions/s "
        f"({dt * 1e3:.0f} ms for {len(pairs)} pairs, median of {args.rounds})")
  figures = {"config": args.config, "pairs_per_s": len(pairs) / dt, "questions_per_s": len(pairs) / 4 / dt}
  if cfg.model.family == "decoder":
    gen = Generator(run, params)
    ids = [scorer.vocab.encode(c) for c, _ in pairs[:args.rows * 4:4]]
    gen.generate_ids(ids, args.gen_tokens)  # compiles
    t = time.perf_counter()
    gen.generate_ids(ids, args.gen_tokens)
    dt = time.perf_counter() - t
    print(f"  generation (KV cache, greedy): {len(ids) * args.gen_tokens / dt:,.0f} tokens/s "
          f"({len(ids)} prompts x {args.gen_tokens} tokens in {dt * 1e3:.0f} ms)")
    figures["generation_tokens_per_s"] = len(ids) * args.gen_tokens / dt
  report.write(args.json, figures)


if __name__ == "__main__":
  main()
