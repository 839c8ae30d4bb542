"""Benchmarks: `stepper.model_rnn` against Keras built-ins and hand-written loops.

`python -m benchmarks.rnn --quick` times forward+backward and inference of
every variant in one process, interleaved; `benchmarks.memory` measures peak
memory of one variant per subprocess. See `benchmarks/rnn.py`.

Training experiments (`benchmarks.char_lm`, `benchmarks.delay`,
`benchmarks.demo_seeds`) run several seeds through `benchmarks.experiment`,
which pairs them by seed and reports intervals on the differences.
"""
