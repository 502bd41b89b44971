"""The paper's optimization analysis: gradient similarity by parameter group (similarity.py),
top Hessian eigenvalue (hessian.py), on checkpoints or inside training (analyze.py),
figures (figures.py, needs matplotlib) and the claims report (report.py).

Nothing here imports cats_ds.training.loop (only a type annotation names its Run): training/loop.py
imports `analysis_step` at module level and passes it its per_language_gradients.
"""

from cats_ds.analysis.analyze import analysis_step, analyze_checkpoint

__all__ = ["analysis_step", "analyze_checkpoint"]
