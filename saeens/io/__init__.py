"""Files in and out: atomic writes and JSON reads (files), one SAE in SAELens' layout (saelens),
ensembles as directories of SAEs (export)."""
