"""pytest configuration shared by the test suite."""


def pytest_collection_modifyitems(config, items):
  # tf.test.TestCase ships a deprecated `test_session` method that pytest
  # collects and reports as skipped; it is not one of our tests.
  items[:] = [item for item in items if item.name != "test_session"]
