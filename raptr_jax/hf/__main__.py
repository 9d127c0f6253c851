"""Command line: transformers checkpoints in and out of a workdir.

    python -m raptr_jax.hf import --config=configs/t5.py --hf_dir=DIR --workdir=runs/t5-hf
    python -m raptr_jax.main --config=configs/t5.py --workdir=runs/t5-hf --config.method.name=raptr
    python -m raptr_jax.hf export --workdir=runs/t5-hf --output=exported/t5 [--step=N] [--dtype=bfloat16]

``import`` reads a local transformers checkpoint directory (config.json, model.safetensors or
sharded safetensors with their index, or pytorch_model.bin through torch's tensors-only loader,
and the tokenizer files), sets the run's model section and vocabulary from it (printing every
field it set) and writes ``WORKDIR/pretrained/``; ``main`` continues pretraining from it,
``evaluate`` and ``generate`` read it. ``export`` writes the model of a workdir's checkpoint
(any step, any method) as a directory ``transformers.AutoModelFor*.from_pretrained`` loads.
Config overrides follow as ``section.field=value``.
"""
import argparse
import sys


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m raptr_jax.hf", description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)
  imp = commands.add_parser("import", help="a transformers checkpoint directory into a workdir")
  imp.add_argument("--config", required=True, help="config file[:preset] of the family that holds the checkpoint")
  imp.add_argument("--hf_dir", required=True, help="the transformers checkpoint directory")
  imp.add_argument("--workdir", required=True, help="a fresh workdir")
  imp.add_argument("overrides", nargs="*", help="config overrides as section.field=value")
  exp = commands.add_parser("export", help="a workdir's model to a transformers directory")
  exp.add_argument("--workdir", required=True)
  exp.add_argument("--output", required=True, help="a new folder")
  exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  exp.add_argument("--dtype", default="float32", help="float32 (default) | bfloat16 | float16")
  args = parser.parse_args(argv)
  from raptr_jax.hf import commands as commands_lib  # pylint: disable=g-import-not-at-top
  try:
    if args.command == "import":
      from raptr_jax.config import load_config  # pylint: disable=g-import-not-at-top
      cfg = load_config(args.config, args.overrides)
      commands_lib.import_checkpoint(cfg, args.hf_dir, args.workdir)
      print(f"next: python -m raptr_jax.main --config={args.config} --workdir={args.workdir} "
            "[--config.method.name=...]; python -m raptr_jax.hf export --workdir=... --output=...")
    else:
      commands_lib.export_checkpoint(args.workdir, args.output, args.step, args.dtype)
  except (ValueError, OSError, KeyError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
