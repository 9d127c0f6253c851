"""TensorFlow for the input pipeline only: imported quietly, and kept off the accelerators.

TensorFlow 2.21's C++ libraries log through absl before anything can configure it (oneDNN,
CUDA probing, CPU features: a dozen lines that bury the run's own messages, an error among
them on machines without CUDA), and ``TF_CPP_MIN_LOG_LEVEL`` no longer silences them.
``data_stack()`` imports TensorFlow, seqio and tensorflow-datasets with the process's stderr
captured, then writes back every captured line except those C++ log lines; it also hides the
GPUs from TensorFlow, so it never takes the memory JAX trains in. ``RAPTR_TF_LOGS=1`` shows
everything.
"""
import contextlib
import os
import re
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|"
                    r"[IWE]\d{4} [\d:. ]+\d+ [\w.]+:\d+\]|To enable the following instructions:)")


@contextlib.contextmanager
def quiet_native_logs():
  """Captures file descriptor 2 for the block; replays what is not TensorFlow's C++ logging."""
  if os.environ.get("RAPTR_TF_LOGS"):
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      kept = [line for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True)
              if not _NOISE.match(line)]
      if kept:
        sys.stderr.write("".join(kept))
        sys.stderr.flush()


def data_stack():
  """(tensorflow, seqio, tensorflow_datasets), imported once, quietly, with TF's GPUs hidden."""
  with quiet_native_logs():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    try:
      tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # already initialised: leave it
      pass
    import seqio  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tf, seqio, tfds


def tensorflow():
  return data_stack()[0]
