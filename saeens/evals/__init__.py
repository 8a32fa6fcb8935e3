"""Evaluations of a trained ensemble: intrinsic (reconstruction, sparsity, dictionary), stability
across runs, spliced LM loss, sparse probing and spurious-correlation removal."""
