"""stepper: step any single-step Keras model through time with exact gradients."""

from stepper.engine import model_rnn
from stepper.states import TrainableState
from stepper.steps import Step, as_step

__all__ = [
    "Step",
    "TrainableState",
    "as_step",
    "model_rnn",
]

__version__ = "0.1.0"
