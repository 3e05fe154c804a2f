"""Tests of tqcodec.format, one module per module of the package."""
