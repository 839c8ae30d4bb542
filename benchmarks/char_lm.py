r"""A character-level language model streamed over real text with TBPTT, seeded.

    python -m benchmarks.char_lm          # the published run (hours on 2 busy
                                          # cores; resumes from its JSON)
    python -m benchmarks.char_lm --updates=50,20 --seeds=1 \
        --out=/tmp/lm.json                # a quick look

The text is the Python standard library's own source (`*.py` under
`sysconfig.get_paths()["stdlib"]`), read at run time: nothing is downloaded.
The split is by whole files: the files are shuffled with `--split_seed`, each
is cut to one excerpt of at most `--excerpt` characters (from a random line of
it, so no file dominates), and excerpts from the front of the shuffled list
are held out for validation until they reach `--val_chars`. The training
stream is the other excerpts, concatenated in an order drawn from the
experiment's seed (reshuffled if a run needs more than one pass). Characters
outside printable ASCII map to one "other" symbol.

The model is embedding -> LSTM step -> softmax over the characters. For each
`k1` in `--k1` and each factor `f` in `--k2_factors` it is trained by
`stepper.Trainer(stream=True)` with TBPTT(k1, f*k1), batches of `k1` steps in
`--batch` contiguous streams: one update per batch whose gradient reaches
`f*k1` steps back, into earlier batches when `f > 1`. With `--keras` the
baseline at each `k1` is `keras.layers.LSTM(stateful=True)` fitted on the
same batches with `shuffle=False`: one update per batch, the gradient cut at
the batch's first step, i.e. TBPTT(k1, k1).

Every setting of one `k1` makes the same number of updates (`--updates`, one
per `k1`) on the same text in the same order for a seed; the seed also sets
the weights. `benchmarks.experiment` runs every setting for `--seeds` seeds,
pairs them by seed and compares each with TBPTT(k1, k1) (95% t interval on
the paired differences; an interval holding 0 is a tie). Per run: validation
bits per character (the validation streams run through with the state
carried, from zeros), the online training loss over the last 10% of updates
(each batch is text the model has not yet trained on when `--updates` fits in
one pass), and the median wall time per update. Writes the JSON with every
run (resumed if it exists), a Markdown table and one PNG of the learning
curves per `k1`.

The model and both ways to train it live in `benchmarks.stream_lstm`, shared
with `benchmarks.delay`, which trains the same LSTM on a delay task.
"""

import dataclasses
import os

from absl import app
from absl import flags

from benchmarks import experiment
from benchmarks import lstm_flags
from benchmarks import stdlib_text
from benchmarks import stream_lstm

_K1 = flags.DEFINE_list("k1", ["4", "16"], "Steps per batch (TBPTT k1).")
_K2_FACTORS = flags.DEFINE_list("k2_factors", ["1", "2", "4"],
                                "k2 = factor * k1, for each factor.")
_UPDATES = flags.DEFINE_list(
    "updates", ["2800", "1400"],
    "Optimizer updates per run, one count per --k1 (the same for every "
    "setting of that k1).")
_KERAS = flags.DEFINE_bool("keras", True, "Also run the Keras stateful LSTM "
                           "baseline at each k1.")
_EXCERPT = flags.DEFINE_integer("excerpt", 6000, "Characters kept per file.",
                                lower_bound=1)
_VAL_CHARS = flags.DEFINE_integer(
    "val_chars", 150_000, "Validation characters (whole file excerpts, at "
    "least this many).", lower_bound=1)
_SPLIT_SEED = flags.DEFINE_integer("split_seed", 0, "Shuffles the files "
                                   "before the split (fixed across seeds).")
_OUT = flags.DEFINE_string(
    "out", "benchmarks/results/char_lm.json",
    "JSON results path (resumed if it exists; the table and PNGs go next to "
    "it).")


def main(argv):
  del argv
  k1s = [int(k) for k in _K1.value]
  factors = [int(f) for f in _K2_FACTORS.value]
  updates = dict(zip(k1s, (int(u) for u in _UPDATES.value)))
  if len(updates) != len(_UPDATES.value) or len(k1s) != len(_UPDATES.value):
    raise app.UsageError(f"--updates needs one count per --k1 ({k1s}); got "
                         f"{_UPDATES.value}.")
  hyper = lstm_flags.hyper()
  excerpts, val_text = stdlib_text.stdlib_split(
      _EXCERPT.value, _VAL_CHARS.value, _SPLIT_SEED.value)
  val = stdlib_text.encode(val_text)
  train_chars = sum(len(e) for e in excerpts)
  config = dict(dataclasses.asdict(hyper), excerpt=_EXCERPT.value,
                val_chars=len(val), train_chars=train_chars,
                train_files=len(excerpts), split_seed=_SPLIT_SEED.value,
                updates=updates, vocab=stdlib_text.VOCAB,
                source="stdlib *.py, split by file")
  all_settings = {}
  for k1 in k1s:
    n = updates[k1] * k1 * hyper.batch + 1
    all_settings.update(stream_lstm.settings(
        k1, factors, _KERAS.value,
        lambda seed, n=n: (
            stdlib_text.next_symbol(stdlib_text.training_ids(excerpts, seed,
                                                             n)),
            stdlib_text.next_symbol(val)), hyper, stdlib_text.VOCAB))
  results = experiment.run(all_settings, lstm_flags.SEEDS.value, _OUT.value,
                           config)
  text = stream_lstm.report(
      results, k1s, _OUT.value,
      f"char LM, LSTM {hyper.units}, stdlib split by file", "bits/char")
  with open(os.path.splitext(_OUT.value)[0] + ".md", "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  app.run(main)
