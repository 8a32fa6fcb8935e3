"""Throughput harness for saeens training steps (not part of the test suite).

`python -m benchmarks` times the library's own jitted train steps (saeens.train.step.make_step with
the real optimizer, saeens.train.bagging.make_bagging_step) for the dense and the sparse
TopK/BatchTopK kernels and reports tokens/s, achieved FLOP/s under a stated FLOP model, the ratio
to this machine's own dense matmul rate (measured right before every case), the fraction of the
encoder-matmul bound, memory per member, and EleutherAI sparsify's TopK step side by side with
ours (benchmarks/peer.py). See benchmarks/harness.py for the method and the FLOP model.
"""
