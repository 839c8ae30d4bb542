"""pytest configuration for the whole checkout: the suite under tests/ and the
docstring examples of the package (`--doctest-modules`, see setup.cfg)."""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Scripts, not library modules: importing them defines absl flags (the demo)
# or is their command line.
collect_ignore = ["stepper/demo.py"]
collect_ignore_glob = ["stepper/**/__main__.py"]


@pytest.fixture(autouse=True)
def _doctest_names(request):
  """The names every docstring example may use without importing them."""
  if not isinstance(request.node, pytest.DoctestItem):
    return
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import stepper  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(0)
  request.getfixturevalue("doctest_namespace").update(
      keras=keras, np=np, tf=tf, stepper=stepper)
