"""cats_ds: DeepSpeed training for one-to-many multilingual translation with CATS."""

__version__ = "0.1.0"
