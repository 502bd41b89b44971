"""Export a dense checkpoint for inference: a CTranslate2 model, the SentencePiece model and
the language tags, with a README.md on how to translate with it.

    pip install -e '.[export]'     # ctranslate2
    python launch/export.py --checkpoint runs/gettext8/best --format ctranslate2 --out exports/gettext8
    python launch/export.py --checkpoint runs/gettext8/avg5 --format ctranslate2 --out exports/int8 \
        --quantization int8

Family-expert checkpoints are refused (dense models only). Same as the `cats-export` command.
"""

from cats_ds.cli import export_main

if __name__ == "__main__":
    export_main()
