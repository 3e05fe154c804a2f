"""Views of a small calibration set: images shifted, token sequences spliced (encoder-only;
``calibrate`` uses them).

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
network's inputs), hence ``VIEWS_BELOW``.

Token sequences (a dict batch of ``input_ids``, with ``attention_mask`` and ``token_type_ids`` if
any) get spliced views: in each of up to ``TEXT_ROUNDS`` rounds (about ``TEXT_VIEWS`` views in
all), every sequence's start joined to another's end at random cuts, so the layers see the same words in contexts the sentences did not hold. A view's
tokens are not counted: an embedding's token counts say how often text uses each token, and
repeating the sample's tokens would make it look complete (Good-Turing reads the missed mass off
the tokens seen once). MiniLM from 32 sentences run (token counts of 1024), tq at 3.0 / 3.1
bits/param, mean (min) cosine: 0.99485 (0.921) / 0.99553 (0.943); with 8 rounds of spliced
views 0.99568 (0.973) / 0.99614 (0.969); with 15% of each view's tokens replaced by random ones
instead 0.99545 / 0.99606. Counting the views' tokens too gave 0.99066 / 0.99231 against 0.99035
/ 0.99282 without views (the sentences' own counts).
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F

VIEWS_BELOW = 256  # a calibration set of fewer images than this gets their shifted views
MAX_KEPT_BYTES = 256 << 20  # the images kept for their views; a set of larger images gets none
MIN_SIDE = 4  # an image is a float tensor [batch, channels, height, width], both sides at least this
SHIFTS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)
TEXT_VIEWS_BELOW = 256  # a set of fewer token sequences than this gets spliced views:
TEXT_VIEWS = 256  # about this many in all (each round costs a forward pass over the set) ...
TEXT_ROUNDS = 8  # ... in at most this many rounds. MiniLM from 128 sentences (counts of 1024), 8
# rounds: mean cosine 0.99651 -> 0.99667 at 3.0 bits/param, where 32 sentences gain 0.00083
TOKEN_KEYS = {"input_ids", "attention_mask", "token_type_ids"}


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


def token_items(x: Any) -> Optional[int]:
    """How many token sequences a batch holds (a dict of ``input_ids`` [batch, tokens] of
    integers, at most ``attention_mask`` and ``token_type_ids`` of that shape beside, and flags
    that are not tensors, such as ``use_cache=False``), or None."""
    if not isinstance(x, Mapping):
        return None
    tensors = {k: v for k, v in x.items() if isinstance(v, torch.Tensor)}
    if not set(tensors) <= TOKEN_KEYS or any(isinstance(v, (Mapping, list, tuple)) for v in x.values()):
        return None
    ids = tensors.get("input_ids")
    if ids is None or ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        return None
    if any(v.shape != ids.shape for v in tensors.values()):
        return None
    return int(ids.shape[0])


def _sequences(x: Mapping) -> list[tuple[list, list]]:
    """The (ids, token types) of each sequence of a token batch, padding left out."""
    ids, mask = x["input_ids"], x.get("attention_mask")
    types = x.get("token_type_ids")
    out = []
    for i in range(ids.shape[0]):
        keep = mask[i] != 0 if mask is not None else torch.ones(ids.shape[1], dtype=torch.bool)
        out.append((ids[i][keep].tolist(), types[i][keep].tolist() if types is not None else []))
    return out


def spliced(kept: list, rounds: int, seed: int = 0) -> Iterator[dict]:
    """``rounds`` spliced views of the token batches ``kept``: in each round, every sequence's
    start (up to a random cut after its first token) joined to the end of another (from a random
    cut after its first token, later where the join would be longer than the longest sequence of
    ``kept``), as batches of the sizes and keys of ``kept``, padded as they pad (the id under the
    first masked position, else 0). Seeded."""
    seqs = [s for x in kept for s in _sequences(x)]
    if len(seqs) < 2:
        return
    longest = max(int(x["input_ids"].shape[1]) for x in kept)
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        partner = rng.permutation(len(seqs))
        made = []
        for (a, ta), j in zip(seqs, partner):
            b, tb = seqs[j]
            p = int(rng.integers(1, max(2, len(a))))
            q = int(rng.integers(1, max(2, len(b))))
            q = max(q, len(b) - (longest - p))  # too long: less of the other's end, its last token kept
            made.append((a[:p] + b[q:], ta[:p] + tb[q:]))
        start = 0
        for x in kept:
            part = made[start:start + int(x["input_ids"].shape[0])]
            start += len(part)
            yield _batch_of(part, x)


def _batch_of(part: list, like: Mapping) -> dict:
    ids = like["input_ids"]
    mask = like.get("attention_mask")
    pad = int(ids[mask == 0][0]) if mask is not None and bool((mask == 0).any()) else 0
    width = max(len(s) for s, _ in part)
    out = {"input_ids": torch.full((len(part), width), pad, dtype=ids.dtype)}
    if mask is not None:
        out["attention_mask"] = torch.zeros((len(part), width), dtype=mask.dtype)
    if "token_type_ids" in like:
        out["token_type_ids"] = torch.zeros((len(part), width), dtype=like["token_type_ids"].dtype)
    for r, (s, t) in enumerate(part):
        out["input_ids"][r, :len(s)] = torch.tensor(s, dtype=ids.dtype)
        if mask is not None:
            out["attention_mask"][r, :len(s)] = 1
        if "token_type_ids" in out and t:
            out["token_type_ids"][r, :len(t)] = torch.tensor(t, dtype=out["token_type_ids"].dtype)
    return {k: out.get(k, v) for k, v in like.items()}  # flags (not tensors) as they were


def text_rounds(sequences: int) -> int:
    """How many rounds of spliced views a set of ``sequences`` token sequences gets."""
    return max(1, min(TEXT_ROUNDS, round(TEXT_VIEWS / max(sequences, 1))))


def with_views(batches: Iterable[Any], seed: int = 0) -> Iterator[tuple[Any, bool]]:
    """(batch, whether it is a view): the ``batches``, then their views when every one held
    images and they were fewer than ``VIEWS_BELOW`` (and at most ``MAX_KEPT_BYTES``): each of the
    eight one-pixel shifts of every batch in turn (shift by shift, batches in their order); or when
    every one held token sequences and they were fewer than ``TEXT_VIEWS_BELOW``:
    :func:`text_rounds` rounds of spliced sequences (:func:`spliced`, seeded by ``seed``)."""
    kept: Optional[list] = []
    kind = None
    items = kept_bytes = 0
    for x in batches:
        yield x, False
        if kept is None:
            continue
        n, k = image_items(x), "images"
        if n is None:
            n, k = token_items(x), "tokens"
        if n is None or kind not in (None, k):
            kept = None
            continue
        kind = k
        items += n
        kept_bytes += sum(t.numel() * t.element_size() for t in _tensors(x) if isinstance(t, torch.Tensor))
        below = VIEWS_BELOW if kind == "images" else TEXT_VIEWS_BELOW
        if items < below and kept_bytes <= MAX_KEPT_BYTES:
            kept.append(x)
        else:
            kept = None
    if not kept:
        return
    if kind == "tokens":
        for x in spliced(kept, text_rounds(items), seed):
            yield x, True
        return
    for dy, dx in SHIFTS:
        for x in kept:
            yield shifted(x, dy, dx), True
