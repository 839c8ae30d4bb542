"""Keras callbacks for `stepper.Trainer`, and how the trainer calls them.

`Trainer.fit` honours the Keras callback hooks a custom loop can:
`on_train_begin/end`, `on_epoch_begin/end` and `on_train_batch_begin/end`;
`callback.model` is the trainer (so `callback.model.stop_training = True`
ends `fit`).
"""

from typing import Any, Sequence

import keras


class BatchLosses(keras.callbacks.Callback):
  """Collects the training loss of every batch (the learning curve).

  >>> curve = stepper.BatchLosses()  # trainer.fit(..., callbacks=[curve])
  >>> for batch, loss in enumerate([0.9, 0.5]):  # What `fit` does per batch.
  ...   curve.on_train_batch_end(batch, {"loss": loss})
  >>> curve.losses  # One float per batch, in order.
  [0.9, 0.5]

  `stepper.Trainer`'s example uses it with `fit`.

  Attributes:
    losses: The loss of every batch so far, a list of floats.
  """

  def __init__(self):
    super().__init__()
    self.losses: list[float] = []

  def on_train_batch_end(self, batch, logs=None):
    self.losses.append(logs["loss"])


_HOOKS = ("on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end",
          "on_train_batch_begin", "on_train_batch_end")


def check_callbacks(callbacks: Any) -> list:
  """`callbacks` as a list; each must have at least one hook.

  Raises:
    TypeError: If `callbacks` is not a list/tuple (one callback passed
      bare) or an entry has none of the hooks.
  """
  if callbacks is None:
    return []
  if not isinstance(callbacks, (list, tuple)):
    raise TypeError(f"`callbacks` must be a list of Keras callbacks; got "
                    f"one {type(callbacks).__name__}. Pass [callback].")
  for i, callback in enumerate(callbacks):
    if not any(hasattr(callback, hook) for hook in _HOOKS):
      raise TypeError(f"`callbacks`[{i}] is {callback!r} of type "
                      f"{type(callback).__name__}, which has none of the "
                      f"hooks {_HOOKS}; pass keras.callbacks.Callback "
                      "objects.")
  return list(callbacks)


class Dispatcher:
  """Calls a hook on every callback that has it.

  Args:
    callbacks: Keras callbacks (or any objects with some of the hooks).
    model: What `callback.model` is set to (the trainer).
  """

  def __init__(self, callbacks: Sequence[Any] | None, model: Any):
    self._callbacks = check_callbacks(callbacks)
    for callback in self._callbacks:
      if hasattr(callback, "set_model"):
        callback.set_model(model)

  def call(self, hook: str, *args) -> None:
    """Calls `callback.<hook>(*args)` on the callbacks that define it."""
    for callback in self._callbacks:
      method = getattr(callback, hook, None)
      if method is not None:
        method(*args)
