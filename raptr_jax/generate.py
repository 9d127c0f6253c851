"""Text generation from a checkpoint: greedy, or temperature / top-k sampling.

    python -m raptr_jax.generate --config=configs/ul2.py --workdir=runs/ul2 --prompt="ROMEO:"
    python -m raptr_jax.generate --config=configs/gpt.py --workdir=runs/gpt --prompt="To be, or" \\
        --max_new_tokens=64 --temperature=0.8 --top_k=40 --seed=1

Decoder models use a key/value cache (``downstream/generate.py``; ``--no_cache`` runs the full
model every step instead); T5 re-runs its decoder; BERT generates nothing. The function is
``raptr_jax.downstream.generate.generate(run, params, prompts, ...)``.
"""
import argparse
import sys


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m raptr_jax.generate", description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="the run's config file[:preset]")
  parser.add_argument("--workdir", required=True, help="the run's workdir (its checkpoints)")
  parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
  parser.add_argument("--max_new_tokens", type=int, default=48)
  parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  parser.add_argument("--top_k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  parser.add_argument("--no_cache", action="store_true", help="no KV cache: the full model every step")
  parser.add_argument("overrides", nargs="*", help="config overrides as section.field=value")
  args = parser.parse_args(argv)
  from raptr_jax.config import load_config  # pylint: disable=g-import-not-at-top
  from raptr_jax.downstream.generate import Generator  # pylint: disable=g-import-not-at-top
  from raptr_jax.evaluate import restore  # pylint: disable=g-import-not-at-top
  try:
    if args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0:
      raise ValueError("--max_new_tokens must be >= 1, --temperature and --top_k >= 0")
    cfg = load_config(args.config, args.overrides)
    run, step, params, _ = restore(cfg, args.workdir, args.step)
    texts = Generator(run, params).generate(args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                                            args.seed, not args.no_cache)
  except (ValueError, OSError, RuntimeError) as e:
    sys.exit(f"error: {e}")
  for prompt, text in zip(args.prompt, texts):
    print(f"--- step {step}: {prompt!r}\n{prompt}{text}")


if __name__ == "__main__":
  main()
