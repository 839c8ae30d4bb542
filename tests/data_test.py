"""Tests for `stepper.data.streams`.

Reference: the stream layout written out in numpy with plain index
arithmetic (stream `b` = steps `[b*L, (b+1)*L)`, element `j` = its steps
`[j*window, (j+1)*window)`), independent of the tf.data pipeline.
"""

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import stepper


def _numpy_streams(sequence, batch_size, window, drop_remainder):
  """The expected elements, by explicit indexing."""
  length = len(sequence) // batch_size
  stops = range(window, length + window, window)
  if drop_remainder:
    stops = [s for s in stops if s <= length]
  return [np.stack([sequence[b * length + s - window:
                             b * length + min(s, length)]
                    for b in range(batch_size)])
          for s in stops]


class StreamsTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("even", 24, 3, 4, True), ("dropped_tail_steps", 26, 3, 4, True),
      ("remainder_dropped", 26, 3, 3, True),
      ("remainder_kept", 26, 3, 3, False),
      ("one_stream", 10, 1, 4, False), ("window_is_stream", 12, 3, 4, True),
      ("window_longer_kept", 12, 3, 5, False))
  def test_elements_match_numpy_indexing(self, n, batch_size, window,
                                         drop_remainder):
    x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    y = np.arange(n, dtype=np.int32) * 10
    resets = np.arange(n) % 5 == 0
    dataset = stepper.data.streams(x, y, batch_size=batch_size,
                                   window=window, resets=resets,
                                   drop_remainder=drop_remainder)
    elements = list(dataset.as_numpy_iterator())
    for got, sequence in zip(zip(*elements), (x, y, resets)):
      want = _numpy_streams(sequence, batch_size, window, drop_remainder)
      self.assertLen(got, len(want))
      for g, w in zip(got, want):
        self.assertAllEqual(g, w)
    self.assertEqual(elements[-1][2].dtype, np.bool_)

  def test_nests_and_static_shapes(self):
    n = 30
    x = {"a": np.zeros((n, 3), np.float32), "b": [np.ones((n,), np.int64)]}
    dataset = stepper.data.streams(x, np.zeros((n, 2)), batch_size=3,
                                   window=5)
    x_spec, y_spec = dataset.element_spec
    self.assertEqual(x_spec["a"].shape, [3, 5, 3])
    self.assertEqual(x_spec["b"][0].shape, [3, 5])
    self.assertEqual(y_spec.shape, [3, 5, 2])
    self.assertEqual(int(dataset.cardinality()), 2)
    first = next(iter(dataset))
    self.assertAllEqual(first[0]["b"][0], np.ones((3, 5)))

  def test_consecutive_elements_continue_each_stream(self):
    sequence = np.arange(40)
    rows = [np.concatenate(parts) for parts in zip(*[
        x for x, _ in stepper.data.streams(
            sequence, sequence, batch_size=4, window=3,
            drop_remainder=False).as_numpy_iterator()])]
    self.assertAllEqual(np.concatenate(rows), sequence)

  @parameterized.named_parameters(
      ("zero", 0), ("negative", -2), ("float", 2.0), ("bool", True))
  def test_streams_raises_on_bad_window(self, window):
    with self.assertRaisesRegex(ValueError, "`window` must be a positive"):
      stepper.data.streams(np.zeros(10), np.zeros(10), batch_size=2,
                           window=window)

  def test_streams_raises_on_bad_batch_size(self):
    with self.assertRaisesRegex(ValueError, "`batch_size` must be a positive"):
      stepper.data.streams(np.zeros(10), np.zeros(10), batch_size=0, window=2)
    with self.assertRaisesRegex(
        ValueError, r"`batch_size` \(11\) is larger than the sequence's 10"):
      stepper.data.streams(np.zeros(10), np.zeros(10), batch_size=11,
                           window=1)

  def test_streams_raises_when_no_window_fits(self):
    with self.assertRaisesRegex(ValueError, r"`window` \(6\) is longer than "
                                r"each stream's 5 steps"):
      stepper.data.streams(np.zeros(10), np.zeros(10), batch_size=2, window=6)

  def test_streams_raises_on_bad_resets(self):
    with self.assertRaisesRegex(TypeError, "`resets` must be a bool array "
                                r"\[N\].*got dtype int64"):
      stepper.data.streams(np.zeros(10), np.zeros(10), batch_size=2,
                           window=2, resets=np.zeros(10, np.int64))
    with self.assertRaisesRegex(ValueError, r"`resets` must have shape \[N\]"
                                r".*\(10, 1\)"):
      stepper.data.streams(np.zeros(10), np.zeros(10), batch_size=2,
                           window=2, resets=np.zeros((10, 1), bool))
    with self.assertRaisesRegex(ValueError, "resets has 9 steps but inputs "
                                "has 10"):
      stepper.data.streams(np.zeros(10), np.zeros(10), batch_size=2,
                           window=2, resets=np.zeros(9, bool))

  def test_streams_raises_on_mismatched_lengths(self):
    with self.assertRaisesRegex(ValueError, r"targets\[1\] has 8 steps but "
                                "inputs has 10"):
      stepper.data.streams(np.zeros(10), [np.zeros(10), np.zeros(8)],
                           batch_size=2, window=2)
    with self.assertRaisesRegex(ValueError, r"inputs has shape \(\) \(rank "
                                r"0\); expected rank >= 1 \(\[N, ...\]\)"):
      stepper.data.streams(np.float32(1), np.zeros(10), batch_size=2,
                           window=2)


if __name__ == "__main__":
  tf.test.main()
