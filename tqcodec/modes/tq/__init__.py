"""Mode ``tq`` (spec §7.5, ``spec/mode-tq.md``): transform quantization.

``format`` holds the bitstream (parameters, decoder, writer); ``encoder`` the numerics that choose
what to write (imported only by encoders)."""
from .format import Params, decode, parse, parts, stream_items, symbol_tables, write

__all__ = ["Params", "decode", "parse", "parts", "stream_items", "symbol_tables", "write"]
