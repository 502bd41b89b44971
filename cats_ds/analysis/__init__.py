"""The paper's optimization analysis: gradient similarity by parameter group (similarity.py),
top Hessian eigenvalue (hessian.py), on checkpoints or inside training (analyze.py),
figures (figures.py, needs matplotlib) and the claims report (report.py).

Importing this package does not import cats_ds.train, so train.py can import
`analysis_step` from here at module level.
"""

from cats_ds.analysis.analyze import analysis_step, analyze_checkpoint

__all__ = ["analysis_step", "analyze_checkpoint"]
