"""Tests of tqcodec.io, one module per module of the package."""
