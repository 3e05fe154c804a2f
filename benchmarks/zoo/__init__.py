"""The benchmark models: this repo's own copies of the project's two reference models, and three
more small models trained here.

- ``digits`` (digits-cnn): LeNet-style CNN on scikit-learn's ``load_digits``; top-1.
- ``minilm`` (minilm): all-MiniLM-L6-v2 sentence embeddings; mean cosine to the original's.
- ``dwsep`` (dwsep-cnn): depthwise-separable CNN with BatchNorm on ``load_digits``; top-1.
- ``seqrnn`` (seqrnn-lstm): 2-layer LSTM reading ``load_digits`` images row by row; top-1.
- ``autoenc`` (conv-autoencoder): convolutional autoencoder with a ConvTranspose2d decoder on
  ``load_digits``; reference's reconstruction MSE over the candidate's (``mse_ratio``).
- ``codelm`` (codelm-gpt2): a 4-layer GPT-2 with a tied 4,096-token embedding, trained on the
  standard library's Python source; reference's perplexity over the candidate's (``ppl_ratio``).

Each module exposes the same surface:

- ``NAME``, ``METRIC``, ``TRANSPARENT`` (the metric value at or above which a candidate counts
  as transparent; every metric is higher-is-better) and ``is_transparent(result)``;
- ``build_module()``: the torch module to load a state_dict into;
- ``reference_state_dict()``: the reference weights (the models trained here take an optional
  cache path, default ``$TQ_ZOO_CACHE/<NAME>.pt``);
- ``calibration_inputs(n)``: real inputs disjoint from the evaluation inputs;
- ``evaluate(state_dict, reference_state_dict) -> dict``: the fixed evaluation, with the
  metric under ``"value"``.

All are CPU-only, offline and deterministic. ``shared.py`` holds what they have in common.
``MODELS`` maps each ``NAME`` to its module, imported on first access.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Iterator, Mapping

MODULES = {  # NAME -> module in this package
    "digits-cnn": "digits",
    "minilm": "minilm",
    "dwsep-cnn": "dwsep",
    "seqrnn-lstm": "seqrnn",
    "conv-autoencoder": "autoenc",
    "codelm-gpt2": "codelm",
}


class _Models(Mapping):
    """NAME -> zoo module; a module is imported only when it is looked up."""

    def __getitem__(self, name: str) -> ModuleType:
        return importlib.import_module(f".{MODULES[name]}", __name__)

    def __iter__(self) -> Iterator[str]:
        return iter(MODULES)

    def __len__(self) -> int:
        return len(MODULES)

    def __repr__(self) -> str:
        return f"MODELS({', '.join(MODULES)})"


MODELS: Mapping[str, ModuleType] = _Models()
