"""Throughput harness for saeens training steps (not part of the test suite).

`python -m benchmarks` times the real jitted train steps (train.make_step with the real optimizer,
bagging.make_bagging_step) for the dense and the sparse TopK kernels and reports tokens/s,
achieved FLOP/s under a stated FLOP model, the ratio to this machine's own dense matmul rate
(measured right before every case) and the fraction of the encoder-matmul bound. See
benchmarks/harness.py for the method and the FLOP model.
"""
