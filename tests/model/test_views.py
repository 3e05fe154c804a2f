"""tqcodec.model.views: a small calibration set of images is followed by its one-pixel shifts."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from tqcodec.model.calibrate import calibrate
from tqcodec.model.views import VIEWS_BELOW, image_items, shifted, with_views


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
    assert len(out) == 2 + 8 * 2
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
