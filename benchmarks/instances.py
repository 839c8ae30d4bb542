"""Times several separately built copies of the same variants, interleaved.

(Flag names differ from `benchmarks.rnn`'s: absl flags are global.)

A graph-mode `tf.function` around a `tf.while_loop` runs at one of two speeds
on a 2-core CPU, fixed per traced instance (see
docs/guides/performance.md). This app shows it: every copy's median paired
ratio to the first copy of the hand-written loop, one line per copy. With
`--inter_op_threads=1` the two speeds become one.

    python -m benchmarks.instances --config=medium --copies=4
    python -m benchmarks.instances --config=medium --inter_op_threads=1
"""

import json

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from benchmarks import timing
from benchmarks import variants as variants_lib

_CONFIG = flags.DEFINE_string("config", "medium", "Config to time.")
_VARIANTS = flags.DEFINE_list("copy_variants", ["while_loop", "stepper"],
                              "Variants to copy; the first one is the floor.")
_COPIES = flags.DEFINE_integer("copies", 4, "Copies built of each variant.",
                               lower_bound=1)
_ROUNDS = flags.DEFINE_integer("rounds", 20, "Timed rounds.", lower_bound=1)
_INTER_OP_THREADS = flags.DEFINE_integer(
    "inter_op_threads", None, "TensorFlow's inter-op threads (default: "
    "TensorFlow's choice).", lower_bound=1)
_JSON = flags.DEFINE_string("json", None, "Also write the ratios here.")


def run(config: variants_lib.Config, names: list[str], copies: int,
        repeats: int) -> dict[str, float]:
  """Median paired ratio of every copy to the first copy of `names[0]`.

  Returns:
    `"{name}#{copy}"` -> ratio, in build order.
  """
  cell = variants_lib.make_cell(config)
  x = variants_lib.make_inputs(config)
  fns = {f"{name}#{i}": variants_lib.build(name, config, cell, 50).train
         for i in range(copies) for name in names}
  raw = timing.interleaved(fns, x, repeats=repeats, warmup=2)
  floor = raw[f"{names[0]}#0"]["times_s"]
  return {key: float(np.median(timing.paired_ratios(r["times_s"], floor)))
          for key, r in raw.items()}


def main(argv):
  del argv
  tf.get_logger().setLevel("ERROR")
  if _INTER_OP_THREADS.value:
    tf.config.threading.set_inter_op_parallelism_threads(
        _INTER_OP_THREADS.value)
  ratios = run(variants_lib.CONFIGS[_CONFIG.value], _VARIANTS.value,
               _COPIES.value, _ROUNDS.value)
  for key, ratio in ratios.items():
    print(f"{key:28s} {ratio:.3f}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"config": _CONFIG.value,
                 "inter_op_threads": _INTER_OP_THREADS.value,
                 "ratios": ratios}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
