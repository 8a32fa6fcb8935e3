"""Downstream evaluations: spliced LM loss, sparse probing, spurious-correlation removal."""
