"""Mode ``pq`` (spec §7.8, ``spec/mode-lineage.md``): product quantization.

``format`` holds the bitstream (parameters, decoder, writer); ``encoder`` the numerics that choose
what to write (imported only by encoders)."""
from .format import Params, decode, parse, parts, stream_items, symbol_tables, write

__all__ = ["Params", "decode", "parse", "parts", "stream_items", "symbol_tables", "write"]
