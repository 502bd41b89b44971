"""Reports over finished runs and evaluations: paired comparisons (compare.py) and learning
curves over the numbered checkpoints (curve.py)."""
