"""Command line: ``python -m raptr_jax.main --config=configs/ul2.py[:preset] [--workdir=DIR]``.

Any config field can be overridden with ``--config.section.field=value``; an unknown field is an
error. Without ``--workdir`` outputs go to ``runs/<config>[-<preset>]``; re-running the same
command resumes from the newest checkpoint there.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from raptr_jax import config as config_lib
from raptr_jax.cli import CONFIG as _CONFIG, parse_flags, skip_absent_tpu

_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default: runs/<config>[-<preset>]).")


def default_workdir(config_arg: str) -> str:
  path, _, preset = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("runs", f"{name}-{preset}" if preset else name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/ul2.py")
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  skip_absent_tpu()  # no libtpu start-up errors on a machine without a TPU
  cfg = _CONFIG.value
  try:
    config_lib.validate(cfg)
  except ValueError as e:
    sys.exit(f"config error: {e}")
  from raptr_jax import train  # pylint: disable=g-import-not-at-top  (jax start-up after flag errors)
  workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
  try:
    train.train(cfg, workdir)
  except train.preemption_lib.Preempted as e:
    sys.exit(e.code)  # 0 after SIGTERM (the checkpoint is written), 130 after SIGINT
  except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint of this step
    sys.exit("interrupted twice: stopped without a checkpoint of the current step; re-run the same "
             "command to resume from the latest checkpoint")
  except (ValueError, OSError, train.TrainingError, train.ckpt_lib.CheckpointError,
          train.workdir_lib.WorkdirBusy, train.cluster.ClusterError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
