"""The pipeline between torch and the coding modes: one tensor at a time (or one whole-model tq
allocation), torch tensors <-> numpy arrays <-> encoded tensors. No files, no process pools:
those are ``tqcodec.io`` and ``tqcodec.parallel``."""
