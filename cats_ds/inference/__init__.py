"""Using a trained model: beam search, evaluation, checkpoint averaging, model folders and
the exports (pytorch model folder, transformers, CTranslate2). Reads checkpoints through
cats_ds/checkpoints.py; imports nothing of training/."""
