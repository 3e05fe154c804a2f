"""Tests of tqcodec.coding, one module per module of the package."""
