"""Numerics of the ``tq`` encoder (arrays only, no files): error-feedback rounding, transforms,
rate-distortion allocation. The bitstream is ``tqcodec.modes.tq`` (spec §7.5)."""
