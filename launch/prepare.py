"""Prepare a corpus: raw text -> one joint SentencePiece model -> binarized shards + manifest.json.

    python launch/prepare.py --config launch/recipes/gettext8.yaml data.dir=data-bin/gettext8
    python launch/prepare.py data.corpus=plain data.raw=/data/mycorpus data.dir=data-bin/mine
    python launch/prepare.py --config launch/recipes/gettext8.yaml --force   # rebuild anyway

A re-run with unchanged inputs and settings is a no-op. Same as the `cats-prepare` command.
"""

from cats_ds.cli import prepare_main

if __name__ == "__main__":
    prepare_main()
