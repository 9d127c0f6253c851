"""One process of a run (``raptr_jax.main`` flags) that also records the example ids of every
training batch it read into IDS_FILE (tests/test_multihost.py):

    python tests/multihost_check.py IDS_FILE --config=configs/ul2.py:tiny --workdir=... [--config.*]
"""
import json
import sys

from absl import app

from raptr_jax import main as main_lib
from raptr_jax.data import pipeline

_next_batch = pipeline.HostStream.next_batch


def recording_next_batch(self):
  batch = _next_batch(self)
  if batch is not None:
    with open(IDS_FILE, "a") as f:
      f.write(json.dumps([[int(i) for i in row if i >= 0] for row in batch["example_ids"]]) + "\n")
  return batch


if __name__ == "__main__":
  IDS_FILE = sys.argv.pop(1)
  pipeline.HostStream.next_batch = recording_next_batch
  app.run(main_lib.main, flags_parser=main_lib.parse_flags)
