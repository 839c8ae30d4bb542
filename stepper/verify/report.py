"""`GradientReport`: rows of compared quantities, each with errors, a verdict.

`compare_values` makes one `Row` from an actual and an expected tensor; every
check of `stepper.verify` reports through it.
"""

import dataclasses
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

_STATUS = {True: "ok", False: "FAIL"}


def default_tolerance(dtype: Any) -> float:
  """Relative tolerance for a dtype: float64 1e-10, else 1e-5."""
  return 1e-10 if tf.as_dtype(dtype) == tf.float64 else 1e-5


@dataclasses.dataclass(frozen=True)
class Row:
  """One compared quantity of a `GradientReport`.

  Errors are normwise: `max_rel_error = max |actual - expected| /
  max |expected|`, so tiny entries of a large tensor do not fail on noise.
  The row passes if `max_abs_error <= atol + rtol * max |expected|`.

  Attributes:
    name: What was compared, e.g. `grad gru_cell/kernel` or `outputs`.
    kind: `"output"`, `"loss"`, `"gradient"` or `"weight"`.
    max_abs_error: `max |actual - expected|` (`inf` if one side is missing).
    max_rel_error: `max_abs_error / max |expected|`.
    cosine: Cosine similarity of the flattened tensors (1 if both are 0).
    rtol: Relative (normwise) tolerance used.
    atol: Absolute tolerance used.
    ok: Whether the row passes.
    note: Why a row failed beyond its numbers (e.g. a missing gradient), or
      what was sampled.
  """
  name: str
  kind: str
  max_abs_error: float
  max_rel_error: float
  cosine: float
  rtol: float
  atol: float
  ok: bool
  note: str = ""


class GradientReport:
  """Rows of compared quantities, each with its errors and pass/fail.

  >>> cell = keras.layers.GRUCell(8)
  >>> x = tf.random.normal([4, 5, 3])
  >>> report = stepper.verify.compare(cell, keras.layers.GRU(
  ...     8, return_sequences=True), x)
  >>> report.ok, [row.name for row in report.failures]
  (True, [])
  >>> print(report)   # an aligned table
  compare cell 'gru_cell...' vs control 'gru...' (float32): PASS
  quantity max|err| max rel cosine rtol status
  outputs ...
  """

  def __init__(self, title: str, rows: Sequence[Row]):
    self.title = title
    self.rows = list(rows)

  @property
  def ok(self) -> bool:
    """Whether every row passes."""
    return all(row.ok for row in self.rows)

  @property
  def failures(self) -> list[Row]:
    """The failing rows."""
    return [row for row in self.rows if not row.ok]

  def row(self, name: str) -> Row:
    """The row called `name`.

    Raises:
      KeyError: If no row has that name.
    """
    for row in self.rows:
      if row.name == name:
        return row
    raise KeyError(f"No row {name!r}; rows are {[r.name for r in self.rows]}.")

  def to_dict(self) -> dict:
    """A JSON-serialisable dict: title, ok and every row's fields."""
    return {"title": self.title, "ok": self.ok,
            "rows": [dataclasses.asdict(row) for row in self.rows]}

  def assert_ok(self) -> None:
    """Raises `AssertionError` listing every failing row (and the table)."""
    if self.ok:
      return
    lines = [f"  {r.name}: max |err| {r.max_abs_error:.3g} > atol "
             f"{r.atol:g} + rtol {r.rtol:g} * max |expected| (rel "
             f"{r.max_rel_error:.3g}, cosine {r.cosine:.6f}){_note(r)}"
             for r in self.failures]
    raise AssertionError(f"{len(lines)} of {len(self.rows)} rows fail in "
                         f"{self.title}:\n" + "\n".join(lines) +
                         f"\n\n{self}")

  def __str__(self) -> str:
    header = ("quantity", "max|err|", "max rel", "cosine", "rtol", "status")
    body = [(r.name, f"{r.max_abs_error:.3e}", f"{r.max_rel_error:.3e}",
             f"{r.cosine:.9f}", f"{r.rtol:.0e}", _STATUS[r.ok] + _note(r))
            for r in self.rows]
    widths = [max(len(line[i]) for line in [header] + body)
              for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(line, widths)))
             + "  " + line[-1] for line in [header] + body]
    verdict = "PASS" if self.ok else f"FAIL ({len(self.failures)} rows)"
    return f"{self.title}: {verdict}\n" + "\n".join(lines)

  def __repr__(self) -> str:
    return (f"GradientReport({self.title!r}, {len(self.rows)} rows, "
            f"ok={self.ok})")


def _note(row: Row) -> str:
  return f" ({row.note})" if row.note else ""


def compare_values(name: str, kind: str, actual: Any, expected: Any,
                    rtol: float, atol: float, note: str = "") -> Row:
  """A `Row` for `actual` against the reference `expected` (either may be
  `None`: a missing gradient)."""
  if actual is None or expected is None:
    if actual is None and expected is None:
      return Row(name, kind, 0.0, 0.0, 1.0, rtol, atol, True,
                 "no gradient on either side")
    side = "step" if actual is None else "reference"
    return Row(name, kind, float("inf"), float("inf"), 0.0, rtol, atol, False,
               f"no gradient on the {side} side")
  a = np.asarray(tf.convert_to_tensor(actual), np.float64).ravel()
  e = np.asarray(tf.convert_to_tensor(expected), np.float64).ravel()
  if a.shape != e.shape:
    return Row(name, kind, float("inf"), float("inf"), 0.0, rtol, atol, False,
               f"{a.size} values vs {e.size} in the reference")
  max_abs = float(np.max(np.abs(a - e))) if a.size else 0.0
  scale = float(np.max(np.abs(e))) if e.size else 0.0
  max_rel = max_abs / scale if scale else (0.0 if max_abs == 0 else np.inf)
  norms = np.linalg.norm(a) * np.linalg.norm(e)
  if norms:
    cosine = float(np.dot(a, e) / norms)
  else:
    cosine = 1.0 if not (a.any() or e.any()) else 0.0
  ok = bool(max_abs <= atol + rtol * scale) and not np.isnan(max_abs)
  return Row(name, kind, max_abs, float(max_rel), cosine, rtol, atol, ok, note)

