"""tqcodec.model.views: a small calibration set of images is followed by its one-pixel shifts, one of
token sequences by sequences spliced from them (whose tokens are not counted)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from tqcodec.model.calibrate import calibrate
from tqcodec.model.views import (TEXT_ROUNDS, TEXT_VIEWS_BELOW, VIEWS_BELOW, image_items, shifted, text_rounds,
                                 token_items, with_views)


class SmallCNN(nn.Module):
    """A conv, then a fully connected layer over the flattened map (the layer few images starve)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN().eval()


def _images(n: int, seed: int) -> torch.Tensor:
    """Smooth random images (a blurred field), so a shift of one pixel keeps them alike."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 12, 12, generator=g)
    x = nn.functional.avg_pool2d(x, 3, stride=1)[..., :8, :8]
    return x / x.std()


def test_shift_moves_each_image_and_repeats_its_edge():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    down_right = shifted(x, 1, 1)[0, 0]
    assert torch.equal(down_right[1:, 1:], x[0, 0, :3, :3])
    assert torch.equal(down_right[0, 1:], x[0, 0, 0, :3]) and torch.equal(down_right[1:, 0], x[0, 0, :3, 0])
    up = shifted(x, -1, 0)[0, 0]
    assert torch.equal(up[:3], x[0, 0, 1:]) and torch.equal(up[3], x[0, 0, 3])
    batch = {"pixel_values": x, "labels": torch.tensor([3])}
    moved = shifted(batch, 0, 1)
    assert torch.equal(moved["labels"], batch["labels"]) and not torch.equal(moved["pixel_values"], x)


def test_a_small_image_set_is_followed_by_its_eight_shifts():
    x = _images(6, 1)
    out = list(with_views([x[:4], x[4:]]))
    assert [view for _, view in out] == [False] * 2 + [True] * 16
    out = [b for b, _ in out]
    assert torch.equal(out[0], x[:4]) and torch.equal(out[1], x[4:])
    assert {tuple(b.shape) for b in out[2:]} == {(4, 1, 8, 8), (2, 1, 8, 8)}
    assert len({b.numpy().tobytes() for b in out}) == len(out)  # every view differs


def test_views_only_for_images_and_only_below_the_threshold():
    assert image_items(torch.zeros(3, 1, 8, 8)) == 3
    assert image_items(torch.zeros(3, 64)) is None  # not an image
    assert image_items(torch.zeros(3, 8, 8, dtype=torch.long).unsqueeze(1)) is None  # not float
    assert image_items({"input_ids": torch.zeros(2, 9, dtype=torch.long)}) is None
    many = _images(VIEWS_BELOW, 2)
    assert len(list(with_views([many[:128], many[128:]]))) == 2  # enough images: none
    assert len(list(with_views([many[:4], torch.zeros(4, 64)]))) == 2  # not all images: none
    ids = torch.ones(3, 5, dtype=torch.long)
    assert token_items({"input_ids": ids}) == 3 and token_items({"input_ids": ids.float()}) is None
    assert token_items({"input_ids": ids, "labels": ids}) is None  # a key a view would not know how to splice
    assert token_items({"input_ids": ids, "use_cache": False}) == 3  # flags pass through
    flagged = [b for b, v in with_views([{"input_ids": ids, "use_cache": False}]) if v]
    assert flagged and all(b["use_cache"] is False and set(b) == {"input_ids", "use_cache"} for b in flagged)
    assert len(list(with_views([{"input_ids": ids}, many[:4]]))) == 2  # tokens, then images: none
    lots = {"input_ids": torch.ones(TEXT_VIEWS_BELOW, 5, dtype=torch.long)}
    assert len(list(with_views([lots]))) == 1


def _token_batches():
    g = torch.Generator().manual_seed(7)
    out = []
    for lengths in ((6, 4, 9), (7, 3)):
        width = max(lengths)
        ids = torch.zeros(len(lengths), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, n in enumerate(lengths):
            ids[r, :n] = torch.cat([torch.tensor([1]), torch.randint(3, 50, (n - 2,), generator=g), torch.tensor([2])])
            mask[r, :n] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)})
    return out


def test_token_sequences_are_followed_by_spliced_ones():
    """Each view keeps a sequence's first token and another's last (here [CLS] = 1 and [SEP] = 2),
    uses only the sample's tokens, pads as the sample pads, is no longer than its longest
    sequence, and the same seed gives the same views."""
    batches = _token_batches()
    out = list(with_views(batches, seed=3))
    assert text_rounds(5) == TEXT_ROUNDS and text_rounds(128) == 2 and text_rounds(255) == 1
    assert [view for _, view in out] == [False] * 2 + [True] * 2 * TEXT_ROUNDS
    views = [b for b, v in out if v]
    assert [len(v["input_ids"]) for v in views] == [3, 2] * TEXT_ROUNDS
    sample = {int(t) for b in batches for t in b["input_ids"][b["attention_mask"] == 1]}
    originals = {tuple(b["input_ids"][r][b["attention_mask"][r] == 1].tolist()) for b in batches for r in range(len(b["input_ids"]))}
    new = 0
    for v in views:
        assert set(v) == {"input_ids", "attention_mask", "token_type_ids"} and v["input_ids"].shape[1] <= 9
        for r in range(len(v["input_ids"])):
            seq = v["input_ids"][r][v["attention_mask"][r] == 1].tolist()
            assert seq[0] == 1 and seq[-1] == 2 and set(seq) <= sample
            assert v["attention_mask"][r].tolist() == sorted(v["attention_mask"][r].tolist(), reverse=True)
            assert (v["input_ids"][r][v["attention_mask"][r] == 0] == 0).all()
            new += tuple(seq) not in originals
    assert new > len(views)  # mostly sequences the sample does not hold
    again = [b for b, v in with_views(batches, seed=3) if v]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(views, again))


class TinyText(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 6)
        self.mix = nn.Linear(6, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, input_ids, attention_mask, token_type_ids):
        h = self.emb(input_ids)
        h = h + torch.tanh(self.mix(h.cumsum(1) / torch.arange(1, h.shape[1] + 1).view(1, -1, 1)))  # context
        return self.fc(h)


def test_text_views_reach_the_layers_but_leave_the_token_counts_alone():
    torch.manual_seed(0)
    m = TinyText().eval()
    batches = _token_batches()
    plain = calibrate(m, batches, views=False)
    viewed = calibrate(m, batches)
    assert np.array_equal(viewed.get("emb.weight").counts, plain.get("emb.weight").counts)
    assert viewed.get("emb.weight").rows == plain.get("emb.weight").rows == 29
    assert viewed.get("fc.weight").rows > 5 * plain.get("fc.weight").rows  # the spliced contexts
    assert not np.allclose(viewed.get("fc.weight").h, plain.get("fc.weight").h)


def test_few_images_with_their_views_reach_the_fully_connected_layer_better():
    """From 8 images, the fc layer's H (256 inputs) has rank 8 without views; with them it is nearer
    the H of 4,000 images, and so is the output error it predicts for an error of the fc layer."""
    m = _cnn()
    few = _images(8, 3)
    plain = calibrate(m, [few], sensitivity=False, views=False).get("fc.weight")
    viewed = calibrate(m, [few], sensitivity=False).get("fc.weight")
    truth = calibrate(m, [_images(4000, 4)], sensitivity=False).get("fc.weight")
    assert plain.rows == 8 and viewed.rows == 8 * 9
    assert np.linalg.matrix_rank(plain.h[0]) == 8 and np.linalg.matrix_rank(viewed.h[0]) > 40

    def distance(s) -> float:
        return float(np.linalg.norm(s.h[0] - truth.h[0]) / np.linalg.norm(truth.h[0]))

    assert distance(viewed) < 0.8 * distance(plain)
    # an error the 8 images cannot see (their H's null space), as error feedback would leave one:
    # without views it looks free, with them it costs a fair share of what it really costs
    _, vectors = np.linalg.eigh(plain.h[0])
    unseen = vectors[:, :-8]
    e = np.random.default_rng(5).standard_normal((5, unseen.shape[1])) @ unseen.T

    def predicted(s) -> float:
        return float(np.trace(e @ s.h[0] @ e.T))

    assert predicted(plain) < 1e-9 * predicted(truth) and predicted(viewed) > 0.3 * predicted(truth)


def test_views_are_deterministic_and_can_be_turned_off():
    m = _cnn()
    x = _images(8, 6)
    a, b = calibrate(m, [x]), calibrate(m, [x])
    assert np.array_equal(a.get("fc.weight").h, b.get("fc.weight").h) and a.get("fc.weight").gain == b.get("fc.weight").gain
    assert calibrate(m, [x], views=False).get("conv.weight").rows == 8 * 64
    assert a.get("conv.weight").rows == 9 * 8 * 64
