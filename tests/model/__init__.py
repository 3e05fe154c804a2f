"""Tests of tqcodec.model, one module per module of the package."""
