"""stepper: step any single-step Keras model through time with exact gradients."""

from stepper.chunking import StatefulRunner, run_chunks
from stepper.engine import model_rnn
from stepper.states import TrainableState
from stepper.steps import Step, as_step
from stepper import tbptt

__all__ = [
    "StatefulRunner",
    "Step",
    "TrainableState",
    "as_step",
    "model_rnn",
    "run_chunks",
    "tbptt",
]

__version__ = "0.1.0"
