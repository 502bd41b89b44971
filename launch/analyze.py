"""The paper's optimization analysis: gradient similarity by parameter group, lambda_max,
figures (Figures 2-6) and a report of the paper's claims vs. our runs.

On a checkpoint (one CPU process; add --device cuda on a GPU):
    python launch/analyze.py --checkpoint runs/gettext8/best --pairs de:af,uk:kk --out results/analysis
    python launch/analyze.py --checkpoint runs/gettext8/best analysis.sentences=32 analysis.hessian_iters=50
During training, every N updates (written to <save_dir>/analysis.jsonl and TensorBoard):
    deepspeed --num_gpus 2 launch/train.py --deepspeed_config ds_configs/cpu_zero2.json \
        --config launch/recipes/gettext8.yaml analysis.every=100 "analysis.pairs=[de:af,uk:kk]"
Figures of several runs side by side, plus the claims report:
    python launch/analyze.py --run T1=runs/paper/t1 --run Tinf=runs/paper/tinf --run noaffine=runs/paper/noaffine \
        --out results/figures --report

Writes analysis.json, tensorboard/, lambda_max.png, hilo_cos.png, group_similarity.png,
loss_curves.png (and report.md / report.json). Same as the `cats-analyze` command.
"""

from cats_ds.cli import analyze_script

if __name__ == "__main__":
    analyze_script()
