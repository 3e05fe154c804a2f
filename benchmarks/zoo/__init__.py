"""The benchmark models: this repo's own copies of the project's two reference models.

Each module (``digits``, ``minilm``) exposes the same surface:

- ``NAME``, ``METRIC``, ``TRANSPARENT`` (the metric value at or above which a candidate counts
  as transparent) and ``is_transparent(result)``;
- ``build_module()``: the torch module to load a state_dict into;
- ``reference_state_dict()``: the reference weights;
- ``calibration_inputs(n)``: real inputs disjoint from the evaluation inputs;
- ``evaluate(state_dict, reference_state_dict) -> dict``: the fixed evaluation, with the
  metric under ``"value"``.

Both are CPU-only, offline and deterministic. ``shared.py`` holds what they have in common.
"""
