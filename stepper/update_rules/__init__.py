"""How the `Trainer` turns batches into optimizer updates: one rule each.

Each update rule is one object in its own module; adding a rule adds a
module, not branches in `stepper.train`:

* `FullBPTT` (`full.py`): one update per batch, backpropagating all of it.
* `TBPTT` (`truncated.py`): BPTT(k2; k1), an update every `k1` steps.
* `Online` (`online.py`): an update every batch from the influence an
  online estimator (`stepper.online`: RTRL, SnAp-1, UORO) carries forward.
* `Stream` (`stream.py`): drives one of the above (or any rule with
  `run_batch`) over a stream whose batches continue each other.

The interface (`rule.UpdateRule`):

* A rule is constructed from a `rule.Context`: the step the engine runs
  (`model`; with the head inside if the head mixes time steps), the `head`
  applied after the loop (else None), the per-example `loss`, the
  `optimizer`, the `strategy`, `clip`, `jit_compile`, `hoist`, the
  trainer's `global_step` and `traces` counters, `targets_per_step` and,
  once built, the `trainable` variables. Rule-specific options (`k1`,
  `k2`, an estimator) are keyword arguments of its constructor.
* `build(element_spec)`: once, after the variables exist.
* `check_spec(spec, name)`: static checks of a training dataset.
* `train_batch(iterator) -> [(loss, grad_norm), ...]`: the next batch's
  updates, each applied by the rule (through `apply`, which clips, unscales
  a `LossScaleOptimizer`'s gradient and sums replicas) and counted in
  `global_step` (through `run_update`).
* Rules a `Stream` drives also define `run_batch(element, carry, offset,
  time) -> (updates, carry)`, `initial_carry(batch)` (what a stream starts
  from: the step's initial state, or e.g. a state and an influence matrix
  for an online estimator), `k1` (the update grid, None: once per batch)
  and `overlap` (history steps the first updates run through again). The
  carry is per replica, any nest of tensors; `Stream` holds it between
  batches and in checkpoints, so a resumed run continues bit for bit.
* A rule that carries anything itself sets `carries = True` and implements
  `reset`, `checkpoint_parts`, `save` and `restore`.
* Class attributes `allow_sequence_level` (targets `[batch, ...]` allowed)
  and `static_time` (batches need a static length) drive dataset checks.

>>> sorted(n for n in dir(stepper.update_rules) if n[0].isupper())
['Context', 'FullBPTT', 'Online', 'Stream', 'TBPTT', 'UpdateRule']
"""

from stepper.update_rules.full import FullBPTT
from stepper.update_rules.online import Online
from stepper.update_rules.rule import Context, UpdateRule
from stepper.update_rules.stream import Stream
from stepper.update_rules.truncated import TBPTT

__all__ = ["Context", "FullBPTT", "Online", "Stream", "TBPTT", "UpdateRule"]
