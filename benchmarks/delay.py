r"""The char LM's LSTM on a delay task, where truncation provably matters.

    python -m benchmarks.delay            # the published run (resumes)
    python -m benchmarks.delay --updates=100 --seeds=1 --out=/tmp/d.json

One long stream of symbols drawn uniformly from `--symbols` (a new stream
per seed, the same for every setting of that seed); the target at step `t`
is the input `--lag` steps back, `y_t = x_{t - lag}`. Nothing else predicts
it: a model that does not remember scores `log2(symbols)` bits per symbol,
one that remembers scores 0.

The model is `benchmarks.char_lm`'s (embedding -> LSTM step -> softmax,
`benchmarks.stream_lstm`), trained the same ways: TBPTT(k1, f*k1) by
`stepper.Trainer(stream=True)` for each factor `f`, and the Keras stateful
LSTM at `k1` (= TBPTT(k1, k1)). In TBPTT(k1, k2) the loss at the `j`-th of an
update's `k1` new steps (`j = 0..k1-1`) gets a gradient from the inputs at
most `k2 - k1 + j` steps back. So with `lag > k2 - 1` no loss step's
gradient reaches the input that holds its target: with the defaults
(`k1 = 4`, `lag = 6`) TBPTT(4, 4) and the Keras baseline (reach <= 3) get no
gradient to learn the memory from, while TBPTT(4, 8) (reach 4..7: steps
j = 2, 3) and TBPTT(4, 16) (reach 12..15: every step) do.

`benchmarks.experiment` runs every setting for `--seeds` seeds and compares
each with TBPTT(k1, k1), paired by seed (95% t interval; an interval holding
0 is a tie). Writes the JSON (resumed if it exists), a Markdown table and a
PNG of the learning curves.
"""

import dataclasses
import os

from absl import app
from absl import flags
import numpy as np

from benchmarks import experiment
from benchmarks import lstm_flags
from benchmarks import stream_lstm

_K1 = flags.DEFINE_integer("k1", 4, "Steps per update (TBPTT k1).",
                           lower_bound=1)
_K2_FACTORS = flags.DEFINE_list("k2_factors", ["1", "2", "4"],
                                "k2 = factor * k1, for each factor.")
_LAG = flags.DEFINE_integer("lag", 6, "The target is the input this many "
                            "steps back.", lower_bound=1)
_SYMBOLS = flags.DEFINE_integer("symbols", 4, "Distinct input symbols.",
                                lower_bound=2)
_UPDATES = flags.DEFINE_integer("updates", 2000, "Optimizer updates per run.",
                                lower_bound=1)
_VAL_STEPS = flags.DEFINE_integer("val_steps", 20_000, "Validation stream "
                                  "length.", lower_bound=1)
_OUT = flags.DEFINE_string(
    "out", "benchmarks/results/delay.json",
    "JSON results path (resumed if it exists; the table and PNG go next to "
    "it).")


def main(argv):
  del argv
  hyper = lstm_flags.hyper()
  k1, lag, symbols = _K1.value, _LAG.value, _SYMBOLS.value
  n = _UPDATES.value * k1 * hyper.batch
  # The validation stream is its own, the same for every run and seed.
  val = stream_lstm.delay_stream(_VAL_STEPS.value, lag, symbols,
                                 np.random.default_rng(2**31 - 1))
  config = dict(dataclasses.asdict(hyper), k1=k1, lag=lag, symbols=symbols,
                updates=_UPDATES.value, val_steps=_VAL_STEPS.value)
  data = lambda seed: (  # pylint: disable=g-long-lambda
      stream_lstm.delay_stream(n, lag, symbols, np.random.default_rng(seed)),
      val)
  results = experiment.run(
      stream_lstm.settings(k1, [int(f) for f in _K2_FACTORS.value], True,
                           data, hyper, vocab=symbols + 1),
      lstm_flags.SEEDS.value, _OUT.value, config)
  text = stream_lstm.report(results, [k1], _OUT.value,
                            f"delay task (lag {lag}, {symbols} symbols), LSTM "
                            f"{hyper.units}", "bits/symbol")
  with open(os.path.splitext(_OUT.value)[0] + ".md", "w") as f:
    f.write(text)
  print(f"chance: {np.log2(symbols):.3f} bits/symbol\n\n{text}")


if __name__ == "__main__":
  app.run(main)
