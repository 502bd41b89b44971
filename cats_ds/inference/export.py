"""Export a checkpoint (or a model folder) for inference outside this project:

    python launch/export.py --checkpoint runs/gettext8/best --format pytorch --out models/gettext8
    python launch/export.py --checkpoint runs/gettext8/best --format transformers --out hf/gettext8
    python launch/export.py --checkpoint runs/gettext8/best --format ctranslate2 --out exports/gettext8

`pytorch` writes a model folder (cats_ds/inference/model_folder.py), `transformers` a Hugging
Face folder (hf_export.py), `ctranslate2` a CTranslate2 model (ct2_export.py). Training
writes the model folder of its best checkpoint at its end (`write_best_model`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from cats_ds.checkpoints import CHECKPOINT_META, load_model
from cats_ds.data.manifest import SPM_PREFIX, Manifest
from cats_ds.inference.ct2_export import _ctranslate2, export_ctranslate2
from cats_ds.inference.export_common import ExportError
from cats_ds.inference.hf_export import export_transformers
from cats_ds.inference.model_folder import write_model_folder
from cats_ds.runtime.output import print0

FORMATS = ("pytorch", "transformers", "ctranslate2")


def export_checkpoint(checkpoint: str | Path, out: str | Path, fmt: str = "ctranslate2", force: bool = False,
                      quantization: Optional[str] = None, data_dir: Optional[str | Path] = None) -> Path:
    """Export a training checkpoint folder (see cats_ds/checkpoints.py) or a model folder
    (cats_ds/inference/model_folder.py) as `fmt`. A DeepSpeed checkpoint needs its data folder for
    spm.model (`data_dir`, default its data.dir); a model folder needs nothing else."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: supported formats: {', '.join(FORMATS)}")
    if quantization and fmt != "ctranslate2":
        raise ExportError(f"--quantization is for --format ctranslate2; --format {fmt} writes float32 weights")
    if fmt == "ctranslate2":
        _ctranslate2()
    cfg, model, vocab, languages, meta = load_model(checkpoint, data_dir=data_dir)
    spm_dir = Path(checkpoint) if meta.get("model_folder") else Path(cfg.data.dir)
    if fmt == "pytorch":
        pairs = None
        if not meta.get("model_folder"):
            manifest = Manifest.load(cfg.data.dir)
            pairs = {lang: manifest.train_pairs(lang) for lang in languages}
        return write_model_folder(cfg, model, languages, spm_dir / f"{SPM_PREFIX}.model", out, meta,
                                  checkpoint=str(checkpoint), force=force, pair_counts=pairs)
    if fmt == "transformers":
        return export_transformers(cfg, model, vocab, languages, out, force=force, checkpoint=str(checkpoint),
                                   step=meta.get("step"), spm_dir=spm_dir,
                                   family_names=(meta.get("families") or {}).get("names"))
    return export_ctranslate2(cfg, model, vocab, languages, out, force=force, quantization=quantization,
                              checkpoint=str(checkpoint), step=meta.get("step"), spm_dir=spm_dir,
                              family_names=(meta.get("families") or {}).get("names"))


BEST_MODEL = "model"
"""The model folder training writes into its best checkpoint: <save_dir>/best/model/."""


def write_best_model(save_dir: str | Path) -> Optional[Path]:
    """At the end of training (rank 0): <save_dir>/best/model/, the model folder of the
    best checkpoint. A failure is reported, not raised: the run itself is complete, and the
    message gives the command that writes the folder later."""
    best = Path(save_dir) / "best"
    if not (best / CHECKPOINT_META).is_file():
        return None
    out = best / BEST_MODEL
    try:
        export_checkpoint(best, out, "pytorch", force=True)
    except Exception as e:  # reported with the fix; training's result stands
        print0(f"| warning: could not write the model folder {out} ({type(e).__name__}: {e}); write it with "
               f"python launch/export.py --checkpoint {best} --format pytorch --out {out} --force")
        return None
    print0(f"| model folder (weights, config, spm.model; needs no data folder): {out}")
    return out
