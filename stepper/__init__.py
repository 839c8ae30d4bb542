"""stepper: step any single-step Keras model through time with exact gradients."""

from stepper.bidirectional import Bidirectional, bidirectional
from stepper.callbacks import BatchLosses
from stepper.chunking import StatefulRunner, run_chunks
from stepper.engine import model_rnn
from stepper.layers import StepRNN
from stepper.stacking import stack
from stepper.states import TrainableState
from stepper.steps import Step, as_step
from stepper.train import Trainer
from stepper import data
from stepper import online
from stepper import tbptt
from stepper import testing
from stepper import verify

__all__ = [
    "BatchLosses",
    "Bidirectional",
    "StatefulRunner",
    "Step",
    "StepRNN",
    "TrainableState",
    "Trainer",
    "as_step",
    "bidirectional",
    "data",
    "model_rnn",
    "online",
    "run_chunks",
    "stack",
    "tbptt",
    "testing",
    "verify",
]

__version__ = "0.1.0"
