"""`Trainer`: the outer training loop around the engine.

The engine (`model_rnn`) is the inner loop over time; `Trainer` is the loop
over batches that users run: it streams `(inputs, targets)` from a `tf.data`
dataset, computes the loss over every step, applies the optimizer (once per
batch with full BPTT, once per window with truncated BPTT), shows a
`keras.utils.Progbar`, writes TensorBoard scalars, checkpoints everything
needed to resume bit for bit, and runs under any `tf.distribute.Strategy`.

Truncated BPTT(k2; k1) (Williams & Peng), `tbptt=(k1, k2)`::

    steps:    0 1 2 3 | 4 5 6 7 | 8 9 ...           k1 = 4, k2 = 6
    update 0: [ loss  ]                            grad back to step 0
    update 1:     [ <-grad- | loss  ]              grad back to step 2
    update 2:               [  <-grad- | loss ]    grad back to step 6

Update `j` takes the loss on the `k1` new steps `[j*k1, (j+1)*k1)` and
backpropagates `k2` steps, to step `(j+1)*k1 - k2`, whose entering state is a
constant; exactly the gradient `stepper.tbptt.updates` defines.
"""

import collections
import time as time_lib
from typing import Any, Sequence

import keras
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from stepper import _checks
from stepper import _targets
from stepper import _train_args
from stepper import callbacks as callbacks_lib
from stepper import engine
from stepper import steps as steps_lib
from stepper import streaming
from stepper import update_rules

Nest = Any

_SUM = tf.distribute.ReduceOp.SUM
# What `tf.summary.scalar` writes, without needing the tensorboard package
# (not a dependency): TensorBoard's scalars plugin reads these.
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
    data_class=summary_pb2.DATA_CLASS_SCALAR).SerializeToString()


class Trainer:
  """Trains a step model (or a stack) plus an optional Keras head.

  >>> x_t, h = keras.Input((2,)), keras.Input((8,))
  >>> y_t, new_h = keras.layers.GRUCell(8)(x_t, [h])
  >>> step = keras.Model([x_t, h], [y_t, new_h[0]])
  >>> trainer = stepper.Trainer(step, keras.layers.Dense(1), loss="mse",
  ...                           optimizer=keras.optimizers.Adam(1e-2))
  >>> dataset = tf.data.Dataset.from_tensor_slices(
  ...     (tf.random.normal([32, 10, 2]), tf.random.normal([32, 1]))).batch(8)
  >>> curve = stepper.BatchLosses()
  >>> history = trainer.fit(dataset, epochs=2, callbacks=[curve],
  ...                       verbose=0)  # verbose=1: a Progbar per epoch
  >>> len(history["loss"]), len(curve.losses)  # per epoch, per batch
  (2, 8)

  Dataset elements are `(inputs, targets)` or `(inputs, targets, resets)`
  (bool `[batch, time]`, as in `model_rnn`). `inputs` is a tensor or nest,
  each leaf `[batch, time, ...]`. `targets` is either per step,
  `[batch, time, ...]` shaped like the predictions, or (full BPTT only)
  sequence-level, `[batch, ...]` shaped like the last step's prediction. For
  sparse labels (integer targets) the predictions' last dimension is dropped
  from the expected shape. A float target that fits both readings (e.g.
  `[batch, 5]` against per-step predictions `[batch, time=5, 1]` and last-step
  predictions `[batch, 5]`) is read as sequence-level.

  Under a `tf.distribute.Strategy`, build the step model and the head and
  create the optimizer inside `strategy.scope()` (as for `keras.Model.fit`).
  Layers that build lazily (RNN cells, `Dense`) are built by the trainer
  inside the scope. Each replica computes its rows' share of the global mean
  loss and gradient; the optimizer sums the shares. Several machines: set
  `TF_CONFIG` on each worker and pass
  `tf.distribute.MultiWorkerMirroredStrategy()`; the same code runs (batch
  the dataset with the global batch size). A distributed iterator is not
  checkpointable, so under a strategy a resumed `fit` restarts the data
  stream (model, optimizer and step counter are restored).

  Attributes:
    history: Dict of lists: `loss` (the mean training loss of each epoch),
      `val_loss` with `validation_data`, accumulated over `fit` calls.
    stop_training: Set to True (e.g. by a callback) to end `fit` after the
      current step.
  """

  def __init__(self, step: Any, head: keras.layers.Layer | None = None, *,
               loss: Any, optimizer: keras.optimizers.Optimizer,
               tbptt: tuple[int, int] | None = None,
               gradient_clip_norm: float | None = None,
               strategy: tf.distribute.Strategy | None = None,
               logdir: str | None = None,
               checkpoint_dir: str | None = None,
               jit_compile: bool = False, stream: bool = False,
               hoist: bool = False, online: str | None = None):
    """Configures the training loop; nothing runs or builds yet.

    Args:
      step: A Keras step model, a Keras RNN cell, a callable or a `Step`
        (e.g. from `stepper.stack`); see `stepper.steps`.
      head: Optional Keras layer applied to every step's output `y_t`
        (`[batch, ...]`), e.g. a `Dense` readout. A head that treats each
        row alone (`Dense`, `Activation`, ...: see
        `stepper._train_args.row_wise`) runs after the loop, once on every
        step's rows (`[batch * time, units]`: one large matmul, as Keras
        applies its `Dense` after an `LSTM`); any other head runs inside
        the loop at every step. Same results either way.
      loss: A Keras loss (object or name) or a callable
        `(y_true, y_pred) -> per-example loss` on one step, `[batch, ...]`.
        The training loss is its mean over steps and batch.
      optimizer: A `keras.optimizers.Optimizer`.
      tbptt: `None` for full BPTT, or `(k1, k2)` with `1 <= k1 <= k2`: an
        optimizer update every `k1` steps, backpropagating `k2` steps
        (`stepper.tbptt.Updater`, online: update `j + 1` sees the weights
        update `j` set). Each batch holds independent sequences: the state
        is carried from window to window within the batch and starts from
        the initial state at the next batch, so checkpoints (between
        batches) need no carried state.
      gradient_clip_norm: Clip the gradient of each update to this global
        norm (`tf.clip_by_global_norm`), after summing over replicas.
      strategy: A `tf.distribute.Strategy`; defaults to the current one.
      logdir: Directory for TensorBoard scalars (`loss`, `grad_norm`,
        `learning_rate` per update; `val_loss` per epoch). None: no logs.
      checkpoint_dir: Directory for `tf.train.CheckpointManager`. The first
        `fit` restores the latest checkpoint there (model, optimizer, step
        counter, data iterator); every epoch ends with a save.
      jit_compile: Compile the loss-and-gradient computation with XLA, in
        every mode (truncated BPTT's windows have a static size; `online`
        compiles the estimator's loop over each batch).
      stream: Row `b` of every batch continues row `b` of the last (use
        `stepper.data.streams`: shuffled rows cannot be detected); the state
        is carried across batches, with TBPTT as in one batch holding the
        whole streams. Semantics: `stepper.streaming`. Per-step targets.
      hoist: Passed to `model_rnn`: compute the step's input half for all
        steps before the loop (see `model_rnn`). Same results up to float
        rounding.
      online: `None`, or an online gradient estimator of `stepper.online`
        (`"rtrl"`, `"snap1"`, `"uoro"`): an update every batch, the state
        and the influence carried across batches with no cut and
        checkpointed (`stepper.update_rules.Online`). Needs
        `stream=True`; excludes `tbptt`.

    Raises:
      TypeError: If `loss` is not callable, `optimizer` is not a Keras
        optimizer, `strategy` is not a `tf.distribute.Strategy`, or
        `jit_compile`, `stream` or `hoist` is not a bool.
      ValueError: If `tbptt` is not `None` or `(k1, k2)` with
        `1 <= k1 <= k2`, `gradient_clip_norm` is not positive, or `online`
        is not an online estimator, or is given without `stream=True` or
        with `tbptt`.
    """
    self._strategy = _train_args.check_strategy(strategy)
    self._step = steps_lib.as_step(step)
    self._head = head
    # The step with the head at every step: for checks and the first build.
    self._model = _train_args.with_head(self._step, head)
    # A head that treats rows alone runs after the loop, on every step.
    after = head is not None and _train_args.row_wise(head)
    self._tbptt = _train_args.check_tbptt(tbptt)
    for name, flag in (("jit_compile", jit_compile), ("stream", stream),
                       ("hoist", hoist)):
      _checks.check_bool(flag, name)
    online = _train_args.check_online(online, tbptt=self._tbptt,
                                      stream=stream)
    self._logdir = logdir
    self._writer = None
    self._checkpoint_dir = checkpoint_dir
    with self._strategy.scope():
      self._global_step = tf.Variable(0, dtype=tf.int64, trainable=False,
                                      name="global_step")
    self._traces = collections.Counter()
    self._context = update_rules.Context(
        model=self._step if after else self._model,
        head=head if after else None,
        loss=_targets.per_example_loss(loss),
        optimizer=_train_args.check_optimizer(optimizer),
        strategy=self._strategy,
        clip=_train_args.check_clip_norm(gradient_clip_norm),
        jit_compile=jit_compile, hoist=hoist, global_step=self._global_step,
        traces=self._traces, targets_per_step=self._targets_per_step)
    # One object per update rule (`stepper.update_rules`).
    if online is not None:
      self._rule = update_rules.Online(self._context, method=online)
    elif self._tbptt is None:
      self._rule = update_rules.FullBPTT(self._context)
    else:
      self._rule = update_rules.TBPTT(self._context, k1=self._tbptt[0],
                                      k2=self._tbptt[1])
    if stream:
      self._rule = update_rules.Stream(self._rule)
    self._resumed = False  # The first `fit` restores the latest checkpoint.
    self._eval_function = tf.function(self._eval_step,
                                      reduce_retracing=True)
    self.history = collections.defaultdict(list)
    self.stop_training = False

  @property
  def global_step(self) -> int:
    """Optimizer updates made so far (restored from checkpoints)."""
    return int(self._global_step.numpy())

  @property
  def trace_counts(self) -> dict[str, int]:
    """How often each compiled function was traced: `train`, `evaluate`."""
    return dict(self._traces)

  @property
  def trainable_variables(self) -> list[tf.Variable]:
    """The step's and the head's trainable variables (after `fit`)."""
    return list(self._context.trainable or [])

  def fit(self, dataset: tf.data.Dataset, epochs: int = 1,
          steps: int | None = None,
          validation_data: tf.data.Dataset | None = None,
          callbacks: Sequence[keras.callbacks.Callback] | None = None,
          verbose: int = 1) -> dict[str, list[float]]:
    """Trains for `epochs` more epochs.

    Args:
      dataset: `tf.data.Dataset` of `(inputs, targets)` batches (see the
        class docstring).
      epochs: Number of epochs to run in this call.
      steps: Batches per epoch. `None`: one pass over `dataset` per epoch
        (a fresh iterator each epoch). With `steps`, one iterator runs across
        epochs (repeat the dataset) and an epoch also ends if it runs out.
      validation_data: Optional dataset like `dataset`, evaluated after every
        epoch into `history["val_loss"]`.
      callbacks: Keras callbacks; they receive `on_train_begin/end`,
        `on_epoch_begin/end` and `on_train_batch_begin/end` with logs
        `loss`, `grad_norm`, `learning_rate` per step (`loss`, `val_loss`
        per epoch). `callback.model` is this trainer.
      verbose: 1 shows a Progbar per epoch; 0 is silent.

    Returns:
      `history`, a dict of lists.

    Raises:
      ValueError: If the dataset's elements are not `(inputs, targets)` with
        inputs `[batch, time, ...]`, the targets do not match the
        predictions, or `epochs`/`steps` are not positive.
    """
    _checks.check_positive_int(epochs, "epochs")
    if steps is not None:
      _checks.check_positive_int(steps, "steps")
    self._check_dataset(dataset, "dataset", training=True)
    if validation_data is not None:
      self._check_dataset(validation_data, "validation_data")
    iterator = self._iterator(dataset)
    manager = self._checkpoint_manager(iterator, restore=not self._resumed)
    self._resumed = True
    callbacks = callbacks_lib.Dispatcher(callbacks, self)
    self.stop_training = False
    callbacks.call("on_train_begin")
    for epoch in range(epochs):
      logs = self._run_epoch(iterator, epoch, epochs, steps,
                             steps or _known_size(dataset), callbacks, verbose)
      if validation_data is not None:
        logs["val_loss"] = self.evaluate(validation_data)["loss"]
        self._write_scalars({"val_loss": logs["val_loss"]}, self.global_step)
      for key, value in logs.items():
        self.history[key].append(value)
      if steps is None:  # The next epoch's pass, saved at its start.
        iterator = self._iterator(dataset)
        manager = self._checkpoint_manager(iterator, restore=False)
      if epoch + 1 < epochs:  # The next epoch starts the stream over.
        self.reset_states()
      if manager is not None:
        self._rule.save()
        manager.save(checkpoint_number=self._global_step)
      callbacks.call("on_epoch_end", epoch, logs)
      if self.stop_training:
        break
    callbacks.call("on_train_end")
    return dict(self.history)

  def reset_states(self) -> None:
    """Stream mode: the initial state, no TBPTT history, a new update grid."""
    self._rule.reset()

  def evaluate(self, dataset: tf.data.Dataset) -> dict[str, float]:
    """The loss over a whole dataset (no training), as `{"loss": mean}`.

    The mean is over every step and example of the dataset (batches are
    weighted by their size). With truncated BPTT the sequence is run in one
    pass: the carried state is exactly the truncated run's forward state.
    In stream mode the batches are one run over the whole streams.

    Raises:
      ValueError: As in `fit`, for a malformed dataset.
    """
    self._check_dataset(dataset, "dataset")
    iterator = self._iterator(dataset)
    total = count = 0.0
    states = None  # Carried in stream mode only.
    while True:
      try:
        batch_sum, batch_count, states = self._eval_function(
            iterator, states if self._rule.carries else None)
      except (StopIteration, tf.errors.OutOfRangeError):
        break
      total += float(batch_sum)
      count += float(batch_count)
    if count == 0:
      raise ValueError("`dataset` is empty; nothing to evaluate.")
    return {"loss": total / count}

  def predict(self, inputs: Nest, training: bool = False) -> Nest:
    """The head's prediction at every step, `[batch, time, ...]`."""
    context = self._context
    outputs, _ = engine.model_rnn(context.model, inputs, training=training,
                                  hoist=context.hoist)
    if context.head is None:
      return outputs
    return _train_args.over_time(context.head, outputs, training)

  # Building and checkpoints.

  def _build(self, element_spec: tuple, name: str = "dataset") -> None:
    """Creates every variable inside the strategy's scope, then the
    optimizer's slots.

    One eager step on zeros: lazily built layers (cells, the head) must not
    create their variables inside a trace, which a `MirroredStrategy`
    cannot lift out.
    """
    if self._context.trainable is not None:
      return
    x_t = tf.nest.map_structure(
        lambda s: tf.zeros([1] + s.shape[2:].as_list(), s.dtype),
        element_spec[0])
    with self._strategy.scope():
      try:
        self._model(x_t, self._model.initial_state(1), False)
      except (ValueError, TypeError, tf.errors.InvalidArgumentError) as e:
        raise _targets.inputs_error(name, element_spec[0], self._model,
                                    e) from e
      trainable = _checks.unique_by_id(self._step.trainable_variables + (
          list(self._head.trainable_variables) if self._head is not None
          else []))
      if not trainable:
        raise ValueError(f"{self._step.name} and the head have no trainable "
                         "variables; there is nothing to train.")
      self._context.optimizer.build(trainable)
      self._context.trainable = trainable
    self._rule.build(element_spec)

  def _variables(self) -> list:
    return _checks.unique_by_id(self._step.variables + (
        list(self._head.variables) if self._head is not None else []))

  def _checkpoint_manager(self, iterator, restore: bool):
    """A manager over the model, optimizer, step counter and `iterator`;
    with `restore`, continues from the latest checkpoint."""
    if self._checkpoint_dir is None:
      return None
    parts = dict(variables=self._variables(),
                 optimizer=self._context.optimizer,
                 global_step=self._global_step)
    if isinstance(iterator, tf.data.Iterator):
      parts["iterator"] = iterator
      parts.update(self._rule.checkpoint_parts())
    checkpoint = tf.train.Checkpoint(**parts)
    manager = tf.train.CheckpointManager(checkpoint, self._checkpoint_dir,
                                         max_to_keep=3)
    if restore and manager.latest_checkpoint:
      checkpoint.restore(manager.latest_checkpoint).assert_consumed()
      self._rule.restore()
    return manager

  def _iterator(self, dataset: tf.data.Dataset):
    return iter(self._strategy.experimental_distribute_dataset(dataset))

  # The epoch loop.

  def _run_epoch(self, iterator, epoch: int, epochs: int, steps: int | None,
                 target: int | None, callbacks: callbacks_lib.Dispatcher,
                 verbose: int) -> dict[str, float]:
    if verbose:
      print(f"Epoch {epoch + 1}/{epochs}")
    progbar = keras.utils.Progbar(target, verbose=verbose,
                                  stateful_metrics=["steps/s"])
    callbacks.call("on_epoch_begin", epoch)
    losses = []
    start = time_lib.perf_counter()
    while steps is None or len(losses) < steps:
      callbacks.call("on_train_batch_begin", len(losses))
      try:
        updates = self._rule.train_batch(iterator)
      except (StopIteration, tf.errors.OutOfRangeError):
        break
      # The step counter is read only for TensorBoard (a read per batch).
      first = (0 if self._logdir is None
               else self.global_step - len(updates) + 1)
      for i, (loss, grad_norm) in enumerate(updates):
        logs = dict(loss=float(loss), grad_norm=float(grad_norm),
                    learning_rate=_learning_rate(self._context.optimizer))
        self._write_scalars(logs, step=first + i)
      # One batch: the mean over its updates (k1-step windows).
      logs["loss"] = sum(float(loss) for loss, _ in updates) / len(updates)
      losses.append(logs["loss"])
      rate = len(losses) / (time_lib.perf_counter() - start)
      progbar.update(len(losses), [("loss", logs["loss"]),
                                   ("steps/s", rate)])
      callbacks.call("on_train_batch_end", len(losses) - 1, logs)
      if self.stop_training:
        break
    if not losses:
      raise ValueError(
          "`dataset` produced no batch in this epoch. Pass a non-empty "
          "dataset; with `steps`, repeat it (`dataset.repeat()`).")
    if verbose and len(losses) != target:
      progbar.update(len(losses), finalize=True)
    return {"loss": sum(losses) / len(losses)}

  def _write_scalars(self, scalars: dict[str, float], step: int) -> None:
    """Writes TensorBoard scalars at optimizer update `step`."""
    if self._logdir is None:
      return
    if self._writer is None:
      self._writer = tf.summary.create_file_writer(self._logdir)
    with self._writer.as_default(step=step):
      for name, value in scalars.items():
        tf.summary.write(name, tf.constant(value, tf.float32),
                         metadata=_SCALAR_METADATA)

  # Compiled functions: one trace per dataset element spec.

  def _eval_step(self, iterator, states: Nest | None):
    self._traces["evaluate"] += 1
    loss_sum, count, final_states = self._strategy.run(
        lambda e, s: self._rule.loss_sum(e, s, training=False),
        (next(iterator), states))
    return (self._strategy.reduce(_SUM, loss_sum, axis=None),
            self._strategy.reduce(_SUM, count, axis=None), final_states)

  # Validation.

  def _check_dataset(self, dataset: Any, name: str,
                     training: bool = False) -> None:
    """Elements: see `streaming.check_element_spec`."""
    if not isinstance(dataset, tf.data.Dataset):
      raise TypeError(f"`{name}` must be a tf.data.Dataset of (inputs, "
                      f"targets) batches; got {type(dataset).__name__}.")
    spec = dataset.element_spec
    inputs_spec, targets_spec = streaming.check_element_spec(
        spec, name, static_time=self._rule.static_time)
    if training:
      self._rule.check_spec(spec, name)
    self._build(spec, name)
    # Here, not only while tracing: the error is then raised as it is.
    self._targets_per_step(inputs_spec, targets_spec, name)

  def _targets_per_step(self, inputs: Nest, targets: tf.Tensor,
                        name: str = "dataset") -> bool:
    """Whether `targets` are per step (else sequence-level); see the class
    docstring for the rule. Raises a ValueError if they fit neither.

    `inputs` and `targets` may be tensors or `tf.TensorSpec`s.
    """
    return _targets.per_step(
        self._model, inputs, targets,
        allow_sequence_level=self._rule.allow_sequence_level,
        name=name)


def _learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
  """The current rate (a schedule's value at this step)."""
  rate = optimizer.learning_rate
  # A Keras variable wraps a tf.Variable, mirrored under a strategy.
  return float(tf.convert_to_tensor(getattr(rate, "value", rate)))


def _known_size(dataset: tf.data.Dataset) -> int | None:
  """The number of batches if `tf.data` knows it (for the Progbar)."""
  size = int(dataset.cardinality())
  return size if size >= 0 else None
