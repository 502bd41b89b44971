"""Encoder-decoder Transformer, norm variants, family experts."""
