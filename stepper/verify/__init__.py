"""Gradient verification: reports against control models and finite differences.

Three questions a user writing a new recurrence asks, each answered with one
call:

* `compare`: does my step, run through the engine, give the outputs, loss and
  gradients of a trusted full-sequence Keras model (`SimpleRNN`, `GRU`,
  `LSTM`, a stack of them, any user model) with the same weights?
* `numerical`: do the engine's analytic gradients agree with float64 finite
  differences (`tf.test.compute_gradient`)? No control model needed.
* `gradient_horizon`: how far back in time (and down a stack) does the
  gradient of a loss reach, with full BPTT and with a truncation window?
* `alignment`: how well does each online estimator (`stepper.online`) and
  each truncation window point where the exact gradient does (cosine and
  relative error, overall and per variable)?

`compare` and `numerical` return a `GradientReport`: one row per compared
quantity, printable as a table, serialisable with `to_dict`, and
`assert_ok()` for tests. Run `python -m stepper.verify --cell=gru` for a
report on a built-in cell.

One module per concept: `report` (`GradientReport`, `Row`),
`estimator_alignment` (`alignment`, `AlignmentReport`, `AlignmentRow`),
`comparison` (`compare`), `finite_differences` (`numerical`), `horizon`
(`gradient_horizon`, `Horizon`); `find_nonfinite` (`NonfiniteReport`,
`Finding`: where a NaN or Inf first appears) lives in `stepper._nonfinite`.
This package re-exports their public names.
"""

from stepper._nonfinite import Finding
from stepper._nonfinite import NonfiniteReport
from stepper._nonfinite import find_nonfinite
from stepper.verify.estimator_alignment import AlignmentReport
from stepper.verify.estimator_alignment import AlignmentRow
from stepper.verify.estimator_alignment import alignment
from stepper.verify.comparison import compare
from stepper.verify.finite_differences import numerical
from stepper.verify.horizon import Horizon
from stepper.verify.horizon import gradient_horizon
from stepper.verify.report import GradientReport
from stepper.verify.report import Row
from stepper.verify.report import default_tolerance

__all__ = ["AlignmentReport", "AlignmentRow", "Finding", "GradientReport",
           "Horizon", "NonfiniteReport", "Row", "alignment", "compare",
           "default_tolerance", "find_nonfinite", "gradient_horizon",
           "numerical"]
