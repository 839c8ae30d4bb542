"""`alignment`: how well each gradient estimator points where the exact one does.

Marschall, Cho & Savin (JMLR 2020) compare learning algorithms by the
alignment of their gradient with the exact one; a truncation paper shows
the same table for its windows. `alignment` computes it for the online
estimators of `stepper.online` and for truncated BPTT(k2; k1)
(`stepper.tbptt`) over one sequence, with the weights held fixed: the
cosine with the exact (`bptt`) gradient and the normwise relative error
`|g - g*| / |g*|`, over all variables and per variable.
"""

import dataclasses
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from stepper import _train_args
from stepper import online
from stepper import steps as steps_lib
from stepper import tbptt as tbptt_lib
from stepper.verify import _common

Nest = Any


@dataclasses.dataclass(frozen=True)
class AlignmentRow:
  """One estimator's gradient against the exact one, for one variable.

  Attributes:
    estimator: `"rtrl"`, `"snap1"`, `"uoro"` or `"tbptt(k1, k2)"`.
    variable: A variable's name, or `"all"` (every variable, concatenated).
    cosine: Cosine similarity with the exact gradient (1 if both are 0).
    relative_error: `|g - g*| / |g*|` (0 if both are 0, inf if only `g*`
      is).
    norm_ratio: `|g| / |g*|`.
  """
  estimator: str
  variable: str
  cosine: float
  relative_error: float
  norm_ratio: float


class AlignmentReport:
  """Rows of `AlignmentRow`: a table when printed, a dict with `to_dict`.

  >>> cell = keras.layers.GRUCell(3, dtype="float64")
  >>> x = tf.random.normal([2, 6, 2], dtype=tf.float64)
  >>> y = tf.random.normal([2, 6, 3], dtype=tf.float64)
  >>> report = stepper.verify.alignment(cell, x, y, "mse",
  ...                                   methods=["rtrl"], tbptt=[(2, 2)])
  >>> round(report.row("rtrl").cosine, 9)
  1.0
  >>> print(report)  # doctest: +ELLIPSIS
  alignment with the exact gradient (bptt), float64, 6 steps
  estimator  variable  cosine  rel. error  norm ratio
  rtrl       all  ...
  """

  def __init__(self, title: str, rows: Sequence[AlignmentRow]):
    self.title = title
    self.rows = list(rows)

  def row(self, estimator: str, variable: str = "all") -> AlignmentRow:
    """The row of `estimator` and `variable`.

    Raises:
      KeyError: If there is none.
    """
    for row in self.rows:
      if row.estimator == estimator and row.variable == variable:
        return row
    raise KeyError(f"No row ({estimator!r}, {variable!r}); estimators are "
                   f"{sorted({r.estimator for r in self.rows})}.")

  def to_dict(self) -> dict:
    """A JSON-serialisable dict: the title and every row's fields."""
    return {"title": self.title,
            "rows": [dataclasses.asdict(row) for row in self.rows]}

  def __str__(self) -> str:
    header = ("estimator", "variable", "cosine", "rel. error", "norm ratio")
    body = [(r.estimator, r.variable, f"{r.cosine:.6f}",
             f"{r.relative_error:.3e}", f"{r.norm_ratio:.3e}")
            for r in self.rows]
    widths = [max(len(line[i]) for line in [header] + body)
              for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(line, widths)))
             for line in [header] + body]
    return self.title + "\n" + "\n".join(lines)

  def __repr__(self) -> str:
    return f"AlignmentReport({self.title!r}, {len(self.rows)} rows)"


def _compare(estimator: str, variable: str, actual: np.ndarray,
             exact: np.ndarray) -> AlignmentRow:
  a, e = np.ravel(actual), np.ravel(exact)
  norm_a, norm_e = float(np.linalg.norm(a)), float(np.linalg.norm(e))
  if norm_a and norm_e:
    cosine = float(a @ e) / (norm_a * norm_e)
  else:
    cosine = 1.0 if norm_a == norm_e else 0.0
  error = float(np.linalg.norm(a - e))
  relative = error / norm_e if norm_e else (0.0 if error == 0 else np.inf)
  ratio = norm_a / norm_e if norm_e else (1.0 if norm_a == 0 else np.inf)
  return AlignmentRow(estimator, variable, cosine, relative, ratio)


def _tbptt_gradient(model: steps_lib.Step, inputs: Nest, targets: tf.Tensor,
                    loss_fn: Any, k1: int, k2: int, initial_states: Nest,
                    variables: list) -> list[np.ndarray]:
  """BPTT(k2; k1)'s gradient of the whole sequence's mean loss: its
  updates' gradients weighted by their shares of the steps."""
  time = int(tf.nest.flatten(inputs)[0].shape[1])
  updates = tbptt_lib.updates(model, inputs, targets, loss_fn, k1=k1, k2=k2,
                              initial_states=initial_states,
                              variables=variables)
  total = [np.zeros(v.shape, np.float64) for v in variables]
  for j, (_, grads) in enumerate(updates):
    steps = min((j + 1) * k1, time) - j * k1
    total = [t + steps / time * np.asarray(g, np.float64)
             for t, g in zip(total, grads)]
  return total


def alignment(step: Any, inputs: Nest, targets: tf.Tensor, loss_fn: Any,
              methods: Sequence[str] = ("rtrl", "snap1", "uoro"),
              tbptt: Sequence[tuple[int, int]] = (), *, head: Any = None,
              initial_states: Nest | None = None,
              variables: Sequence[tf.Variable] | None = None,
              seed: int | None = 0) -> AlignmentReport:
  """Each estimator's gradient against the exact one, over one sequence.

  Args:
    step: As in `stepper.online.gradients`.
    inputs: Tensor or nest, each leaf `[batch, time, ...]` (`time` static
      with `tbptt`).
    targets: `[batch, time, ...]`, one target per step.
    loss_fn: As in `stepper.online.gradients`.
    methods: Online estimators (`"rtrl"`, `"snap1"`, `"uoro"`) to compare.
    tbptt: `(k1, k2)` windows of truncated BPTT to compare: an update every
      `k1` steps backpropagating `k2`, summed over the sequence's updates
      with the weights held fixed (each weighted by its share of the
      steps, so that `(time, time)` is the exact gradient).
    head: As in `stepper.online.gradients`.
    initial_states: As in `stepper.online.gradients`.
    variables: As in `stepper.online.gradients`.
    seed: UORO's seed (one estimate; its variance: docs/guides/online.md).

  Returns:
    An `AlignmentReport`: a row per estimator over all variables
    (`variable="all"`), then one per variable.

  Raises:
    ValueError: For an unknown method or a malformed `tbptt` window, and
      as `stepper.online.gradients`.
  """
  methods = [online.check_method(m, online.METHODS) for m in methods]
  windows = [_train_args.check_tbptt(tuple(w) if isinstance(w, list) else w)
             for w in tbptt]
  if any(w is None for w in windows):
    raise ValueError(f"`tbptt` must be a list of (k1, k2) pairs; got "
                     f"{tbptt!r}.")
  common = dict(head=head, initial_states=initial_states,
                variables=variables)
  _, exact = online.gradients(step, inputs, targets, loss_fn, method="bptt",
                              **common)
  adapted = steps_lib.as_step(step)
  names = [_common.var_name(v) for v in (
      list(variables) if variables is not None
      else online.default_variables(adapted, head))]
  dtype = exact[0].dtype.name if exact else "float32"
  exact = [np.asarray(g, np.float64) for g in exact]
  estimates = {}
  for method in methods:
    _, grads = online.gradients(step, inputs, targets, loss_fn,
                                method=method, seed=seed, **common)
    estimates[method] = [np.asarray(g, np.float64) for g in grads]
  model = _train_args.with_head(adapted, head)
  for k1, k2 in windows:
    estimates[f"tbptt({k1}, {k2})"] = _tbptt_gradient(
        model, inputs, targets, loss_fn, k1, k2, initial_states,
        list(variables) if variables is not None
        else online.default_variables(adapted, head))
  rows = []
  for estimator, grads in estimates.items():
    rows.append(_compare(estimator, "all",
                         np.concatenate([g.ravel() for g in grads]),
                         np.concatenate([g.ravel() for g in exact])))
    rows += [_compare(estimator, name, g, e)
             for name, g, e in zip(names, grads, exact)]
  flat = tf.nest.flatten(inputs)
  title = (f"alignment with the exact gradient (bptt), {dtype}, "
           f"{flat[0].shape[1]} steps")
  return AlignmentReport(title, rows)
