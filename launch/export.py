"""Export a checkpoint for inference: a CTranslate2 model, the SentencePiece model and
the language tags, with a README.md on how to translate with it.

    pip install -e '.[export]'     # ctranslate2
    python launch/export.py --checkpoint runs/gettext8/best --format ctranslate2 --out exports/gettext8
    python launch/export.py --checkpoint runs/gettext8/avg5 --format ctranslate2 --out exports/int8 \
        --quantization int8

A family-expert checkpoint exports one dense model per family (<out>/<family>/, with
<out>/families.json saying which folder translates which language). Same as `cats-export`.
"""

from cats_ds.cli import export_main

if __name__ == "__main__":
    export_main()
