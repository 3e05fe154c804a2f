"""Shifted views of a small calibration set of images (encoder-only; ``calibrate`` uses them).

A few dozen images leave a layer's input statistics H short of samples: the fully connected
layers of a CNN see one input vector per image, so 32 images give H of rank 32. A convolutional
network is nearly invariant to a shift of one pixel, so the eight one-pixel shifts of each image
(edges replicated) are inputs the network treats as its own, and they reach directions the
images alone miss.

Digits CNN (the benchmark's, 8x8 images), tq, logit SQNR at 0.9 / 1.0 / 1.1 / 1.3 bits/param,
statistics from the first N training images without and with their shifted views:

    N = 32:   19.2 / 21.7 / 23.6 / 27.7 dB    with views 25.4 / 27.4 / 29.3 / 32.1
    N = 128:  24.4 / 26.6 / 29.0 / 31.9       with views 24.5 / 28.0 / 30.2 / 33.9
    N = 256:  26.8 / 28.7 / 30.4 / 33.6       with views (zero-filled) 26.5 / 28.4 / 30.5 / 33.7
    N = 1024: 26.6 / 29.3 / 30.9 / 34.5       with views (zero-filled) 25.8 / 28.8 / 30.3 / 33.2

From 256 images on, the views add nothing and then cost a little (they are not quite the
network's inputs), hence ``VIEWS_BELOW``. Text gets no views: MiniLM from 32 sentences (579
tokens), at 3.0 / 3.1 bits/param mean cosine 0.99035 / 0.99282; with 8 rounds of spliced
sentences (one's prefix, another's suffix) 0.99066 / 0.99231; with 15% of tokens replaced by
random ones 0.97642 / 0.98301.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Optional

import torch
import torch.nn.functional as F

VIEWS_BELOW = 256  # a calibration set of fewer images than this gets their shifted views
MAX_KEPT_BYTES = 256 << 20  # the images kept for their views; a set of larger images gets none
MIN_SIDE = 4  # an image is a float tensor [batch, channels, height, width], both sides at least this
SHIFTS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)


def _is_image(t: Any) -> bool:
    return (isinstance(t, torch.Tensor) and t.dtype.is_floating_point and t.dim() == 4
            and min(t.shape[-2:]) >= MIN_SIDE)


def _tensors(x: Any) -> list:
    if isinstance(x, Mapping):
        return list(x.values())
    if isinstance(x, (tuple, list)):
        return list(x)
    return [x]


def image_items(x: Any) -> Optional[int]:
    """How many images a batch holds (a tensor, tuple/list or dict whose image tensors share their
    first dimension), or None when it holds none."""
    images = [t for t in _tensors(x) if _is_image(t)]
    if not images or len({int(t.shape[0]) for t in images}) != 1:
        return None
    return int(images[0].shape[0])


def shifted(x: Any, dy: int, dx: int) -> Any:
    """``x`` with every image tensor moved ``dy`` pixels down and ``dx`` right (|dy|, |dx| <= 1),
    the edge pixels repeated into the gap; other values as they are."""

    def move(t: Any) -> Any:
        if not _is_image(t):
            return t
        h, w = t.shape[-2:]
        padded = F.pad(t, (1, 1, 1, 1), mode="replicate")
        return padded[..., 1 - dy:1 - dy + h, 1 - dx:1 - dx + w].contiguous()

    if isinstance(x, Mapping):
        return {k: move(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(move(v) for v in x)
    return move(x)


def with_views(batches: Iterable[Any]) -> Iterator[Any]:
    """The ``batches``, then, when every one held images and they were fewer than
    ``VIEWS_BELOW`` (and at most ``MAX_KEPT_BYTES``), each of the eight one-pixel shifts of
    every batch in turn (shift by shift, batches in their order)."""
    kept: Optional[list] = []
    items = kept_bytes = 0
    for x in batches:
        yield x
        if kept is None:
            continue
        n = image_items(x)
        if n is None:
            kept = None
            continue
        items += n
        kept_bytes += sum(t.numel() * t.element_size() for t in _tensors(x) if _is_image(t))
        if items < VIEWS_BELOW and kept_bytes <= MAX_KEPT_BYTES:
            kept.append(x)
        else:
            kept = None
    for dy, dx in SHIFTS if kept else ():
        for x in kept:
            yield shifted(x, dy, dx)
