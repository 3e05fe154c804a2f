"""Entropy coding (spec §8): the range coder and its frequency tables. Arrays in, arrays out."""
from .rangecoder import decode_symbols, encode_symbols
from .tables import frequencies_from_counts

__all__ = ["encode_symbols", "decode_symbols", "frequencies_from_counts"]
