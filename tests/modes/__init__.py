"""Tests of tqcodec.modes, one module per module of the package."""
