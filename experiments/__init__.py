"""Scripts that regenerate every figure and table of the ensembling study (see experiments/README.md)."""
