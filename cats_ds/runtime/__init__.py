"""The process around a run: rank-0 printing and monitors (output.py), stop requests and
requeue (preempt.py), the launcher watchdog (watchdog.py), the outcome-recording wrapper
(supervise.py), the save_dir lock (runlock.py), SLURM host files (slurm.py). The bottom
layer: imports nothing of cats_ds outside runtime/."""
