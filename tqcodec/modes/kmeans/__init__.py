"""Mode ``kmeans`` (spec §7.7, ``spec/mode-lineage.md``): scalar codebooks, one per group of

``format`` holds the bitstream (parameters, decoder, writer); ``encoder`` the numerics that choose
what to write (imported only by encoders)."""
from .format import Params, decode, parse, parts, stream_items, symbol_tables, write

__all__ = ["Params", "decode", "parse", "parts", "stream_items", "symbol_tables", "write"]
