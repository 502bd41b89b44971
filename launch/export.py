"""Export a checkpoint (or a model folder) for inference outside the training run:

    # a model folder: model.safetensors + config.json + spm.model + README.md (training
    # writes one at its end: <save_dir>/best/model/)
    python launch/export.py --checkpoint runs/gettext8/best --format pytorch --out models/gettext8
    # Hugging Face transformers (M2M100 architecture + tokenizer.json)
    pip install -e '.[hf]'
    python launch/export.py --checkpoint runs/gettext8/best --format transformers --out hf/gettext8
    # CTranslate2
    pip install -e '.[export]'     # ctranslate2
    python launch/export.py --checkpoint runs/gettext8/best --format ctranslate2 --out exports/gettext8
    python launch/export.py --checkpoint runs/gettext8/avg5 --format ctranslate2 --out exports/int8 \
        --quantization int8

--checkpoint takes a DeepSpeed checkpoint (which needs its prepared data folder for spm.model:
--data-dir if it moved) or a model folder (which needs nothing else). A family-expert
checkpoint exports one dense model per family for transformers and CTranslate2
(<out>/<family>/, with <out>/families.json saying which folder translates which language).
Every README.md written says how to use its folder. Same as `cats-export`.
"""

from cats_ds.cli import export_main

if __name__ == "__main__":
    export_main()
