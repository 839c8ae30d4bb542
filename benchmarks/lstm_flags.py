"""The command-line flags `benchmarks.char_lm` and `benchmarks.delay` share.

The model's sizes, the optimizer and the seed count, and `hyper()` to read
them as a `stream_lstm.Hyper`. Only the two entry points import this module:
tests import `stream_lstm`, which defines no flags (absl flags are global,
and `stepper.demo` defines some of the same names).
"""

from absl import flags

from benchmarks import stream_lstm

SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds 0..n-1 per setting.",
                             lower_bound=1)
_BATCH = flags.DEFINE_integer("batch", 32, "Parallel streams per batch.",
                              lower_bound=1)
_UNITS = flags.DEFINE_integer("units", 128, "LSTM units.", lower_bound=1)
_EMBED = flags.DEFINE_integer("embed", 32, "Embedding size.", lower_bound=1)
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 3e-3, "Adam's rate.")
_CLIP = flags.DEFINE_float("clip", 1.0, "Global gradient norm clip.")


def hyper() -> stream_lstm.Hyper:
  """The flags' sizes and optimizer settings."""
  return stream_lstm.Hyper(_BATCH.value, _UNITS.value, _EMBED.value,
                           _LEARNING_RATE.value, _CLIP.value)
