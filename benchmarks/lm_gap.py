r"""Why the char LM's online loss is below its validation loss.

    python -m benchmarks.lm_gap            # k1 = 4, 2800 updates, seed 0

Trains TBPTT(k1, k1) for one seed exactly as `benchmarks.char_lm` does (same
split, text order, weights and update count: its online and validation bits
reproduce that run's), then scores the frozen model, each set cut into the
same number of streams from the initial state, on:

* the validation files;
* the training files this run never reached (with `--updates` short of one
  pass over the training text): text from the training distribution that
  the model has not seen, neither trained on nor read in its stream;
* the last 10% of each of its own training streams (text it trained on).

If the unseen training files score like (or worse than) validation, the gap
is not the split: it is that the online loss of a batch is measured after
the model trained on the earlier parts of the same files (each stream stays
in one file for `excerpt / k1` updates).
"""

from absl import app
from absl import flags
import numpy as np

from benchmarks import lstm_flags
from benchmarks import stdlib_text
from benchmarks import stream_lstm

_K1 = flags.DEFINE_integer("k1", 4, "TBPTT(k1, k1).", lower_bound=1)
_UPDATES = flags.DEFINE_integer("updates", 2800, "Optimizer updates.",
                                lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "The experiment seed.")


def main(argv):
  del argv
  hyper, k1, seed = lstm_flags.hyper(), _K1.value, _SEED.value
  # char_lm's defaults: --excerpt=6000 --val_chars=150000 --split_seed=0.
  excerpts, val_text = stdlib_text.stdlib_split(6000, 150_000, 0)
  n = _UPDATES.value * k1 * hyper.batch + 1
  train = stdlib_text.training_ids(excerpts, seed, n)
  # The excerpts the stream never reached: training_ids' first permutation.
  order = np.random.default_rng(seed).permutation(len(excerpts))
  starts = np.cumsum([0] + [len(excerpts[i]) for i in order])
  unseen = "".join(excerpts[i] for i, s in zip(order, starts) if s >= n)
  trainer, losses, _ = stream_lstm.fit_stepper(
      k1, k1, stdlib_text.next_symbol(train), seed, hyper, stdlib_text.VOCAB)
  length = (n - 1) // hyper.batch
  tails = np.concatenate([train[(b + 1) * length - length // 10:
                                (b + 1) * length]
                          for b in range(hyper.batch)])
  tail = max(1, len(losses) // 10)
  print(f"TBPTT({k1},{k1}) seed {seed}, {len(losses)} updates "
        f"({(n - 1) / sum(map(len, excerpts)):.2f} passes)")
  print(f"{'online, last 10% of updates:':<44}"
        f"{np.mean(losses[-tail:]) / np.log(2):.3f} bits/char")
  for name, text_ids in [
      ("validation files", stdlib_text.encode(val_text)),
      (f"unseen training files ({len(unseen)} chars)",
       stdlib_text.encode(unseen)),
      ("its own last 10%, frozen", tails)]:
    bits = stream_lstm.bits_on(trainer, stdlib_text.next_symbol(text_ids), k1,
                               hyper.batch)
    print(f"{name + ':':<44}{bits:.3f} bits/char")


if __name__ == "__main__":
  app.run(main)
