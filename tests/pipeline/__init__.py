"""Tests of tqcodec.pipeline, one module per module of the package."""
