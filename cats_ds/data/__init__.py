"""Corpus readers, SentencePiece vocab, binarized shards, language sampler."""
