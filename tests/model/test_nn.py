"""tqcodec.model.nn: transform-domain layers (TQLinear, TQConv1d, TQConv2d) and load_module (issue 6,
part 1). Tiny models built here; files from the real tq encoder (data-free and with stats) and,
for the synthesis transform and the in_out layout (which the encoder does not write yet), files
written directly with the mode's own encoder (``tqcodec.modes.tq.encode``)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tqcodec
from tqcodec.model import nn as tqnn
from tests.helpers import tq_file

torch.manual_seed(0)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(24, 48)
        self.fc2 = nn.Linear(48, 40, bias=False)
        self.norm = nn.LayerNorm(40)
        self.fc3 = nn.Linear(40, 10)

    def forward(self, x):
        return self.fc3(self.norm(torch.relu(self.fc2(torch.relu(self.fc1(x))))))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=4)  # grouped
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False, padding_mode="reflect")  # depthwise
        self.bn = nn.BatchNorm2d(32)
        self.t1 = nn.Conv1d(32, 24, 3, padding=2, dilation=2, groups=2)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.bn(self.dw(torch.relu(self.c2(h)))))
        h = h.flatten(2)  # [N, 32, H*W]
        h = torch.relu(self.t1(h)).mean(-1)
        return self.fc(h)


def _randomize_bn(m: nn.Module) -> None:
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    m.eval()


def _mlp_inputs(n=32):
    return torch.randn(n, 24)


def _cnn_inputs(n=4):
    return torch.randn(n, 3, 12, 12)


def _counterparts(model: nn.Module, path) -> tuple[nn.Module, nn.Module]:
    dense = tqcodec.load_module(copy.deepcopy(model), path, transform_domain=False)
    tdom = tqcodec.load_module(copy.deepcopy(model), path)
    return dense.eval(), tdom.eval()


def _abs_weight(layer: nn.Module) -> torch.Tensor:
    """|S| |C| (or |W|) in the weight's shape: bounds |R_ij| and every partial sum of it."""
    if layer.transform is None:
        return layer.dense_weight().abs().float()
    c = np.concatenate([np.abs(layer._levels(b).numpy().astype(np.float64)) * layer.band_steps[b]
                        for b in range(layer.num_bands)])
    r = (np.abs(layer.transform.numpy().astype(np.float64)) @ c).T
    if layer.layout == "in_out":
        r = r.T
    return torch.from_numpy(np.ascontiguousarray(r)).float().reshape(layer.weight_shape)


def _check_layer(layer: nn.Module, x: torch.Tensor) -> None:
    """The transform-domain output equals the dense layer with the decoded weight within the
    spec's tolerance (§7.5.3: 2^-20 of sum |S C| per weight) plus float32 summation error."""
    if isinstance(layer, tqnn.TQEmbedding):
        want, got = F.embedding(x, layer.dense_weight()), layer(x)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
        return
    w = layer.dense_weight()
    if isinstance(layer, tqnn.TQLinear):
        want = F.linear(x, w, layer.bias)
        scale = F.linear(x.abs(), _abs_weight(layer)) + (0 if layer.bias is None else layer.bias.abs())
    else:
        conv = F.conv1d if isinstance(layer, tqnn.TQConv1d) else F.conv2d
        xp, pad = x, layer.padding
        if layer.padding_mode != "zeros":
            xp, pad = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), 0
        want = conv(xp, w, layer.bias, layer.stride, pad, layer.dilation, layer.groups)
        scale = conv(xp.abs(), _abs_weight(layer), None if layer.bias is None else layer.bias.abs(),
                     layer.stride, pad, layer.dilation, layer.groups)
    got = layer(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    terms = layer.m + layer.k + 4
    bound = (2.0 ** -20 + 2 * terms * 2.0 ** -24) * scale + 1e-30
    assert torch.all((got - want).abs() <= bound), float(((got - want).abs() / bound).max())


def _layer_inputs(model: nn.Module, x: torch.Tensor) -> dict:
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=name: seen.setdefault(name, inp[0]))
             for name, m in model.named_modules() if isinstance(m, (tqnn._TQBase,))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def _check_model(model: nn.Module, x: torch.Tensor, path, min_swapped: int) -> tuple[nn.Module, nn.Module]:
    dense, tdom = _counterparts(model, path)
    swapped = [n for n, m in tdom.named_modules() if isinstance(m, tqnn._TQBase)]
    assert len(swapped) >= min_swapped
    assert not any(isinstance(m, tqnn._TQBase) for m in dense.modules())
    # every swapped layer, on the input it really sees
    with torch.no_grad():
        for name, inp in _layer_inputs(tdom, x).items():
            _check_layer(tdom.get_submodule(name), inp)
        yd, yt = dense(x), tdom(x)
    assert torch.allclose(yt, yd, rtol=1e-4, atol=1e-5 * float(yd.abs().max())), float((yt - yd).abs().max())
    # state_dict: dense weights, equal to tqcodec.load, same keys as the original model
    ref = tqcodec.load(path)
    sd = tdom.state_dict()
    assert list(sd) == list(model.state_dict())
    for k, v in ref.items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k
        assert torch.equal(dense.state_dict()[k], v), k
    # the dense model loads the transform-domain model's state_dict, strictly
    again = copy.deepcopy(model)
    again.load_state_dict(sd, strict=True)
    # and so does the transform-domain model (its own weights, unchanged)
    tdom.load_state_dict(sd, strict=True)
    # held weight memory: below the fp32 model
    assert tqnn.resident_bytes(tdom) < tqnn.resident_bytes(dense)
    return dense, tdom


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(1)
    return MLP().eval()


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(2)
    m = CNN()
    _randomize_bn(m)
    return m


@pytest.mark.parametrize("with_stats", [False, True])
def test_mlp_encoder_files(tmp_path, mlp, with_stats):
    stats = tqcodec.calibrate(mlp, [_mlp_inputs(64)], sensitivity=False) if with_stats else None
    path = tmp_path / "mlp.tqz"
    tqcodec.save(mlp.state_dict(), path, mode="tq", stats=stats, bits=4.0 if with_stats else None)
    with tqcodec.open(path) as f:
        assert f.info("fc1.weight").mode == "tq"
    dense, tdom = _check_model(mlp, _mlp_inputs(), path, min_swapped=3)
    assert isinstance(tdom.fc2, tqnn.TQLinear) and tdom.fc2.bias is None
    assert isinstance(tdom.norm, nn.LayerNorm)  # not eligible: loaded densely
    assert all(tdom.fc1._levels(b).dtype in (torch.int8, torch.int16, torch.int32) for b in range(tdom.fc1.num_bands))


@pytest.mark.parametrize("with_stats", [False, True])
def test_cnn_encoder_files(tmp_path, cnn, with_stats):
    stats = tqcodec.calibrate(cnn, [_cnn_inputs(8)], sensitivity=False) if with_stats else None
    path = tmp_path / "cnn.tqz"
    tqcodec.save(cnn.state_dict(), path, mode="tq", stats=stats, quality=35)
    dense, tdom = _check_model(cnn, _cnn_inputs(), path, min_swapped=4)
    assert isinstance(tdom.c2, tqnn.TQConv2d) and tdom.c2.groups == 4
    assert isinstance(tdom.dw, tqnn.TQConv2d) and tdom.dw.padding_mode == "reflect"
    assert isinstance(tdom.t1, tqnn.TQConv1d)


# --- files with transforms / in_out layout, written with the mode's encoder -------------------

def test_linear_transforms_and_layouts(tmp_path, mlp):
    plan = {"fc1.weight": ("out_in", 12, [-26, -30]),   # y = (x S) C
            "fc2.weight": ("in_out", None, [-24, -26, -28]),  # y = x C
            "fc3.weight": ("in_out", 6, [-26])}        # y = (x C^T) S^T
    path = tmp_path / "t.tqz"
    path.write_bytes(tq_file(mlp.state_dict(), plan))
    dense, tdom = _check_model(mlp, _mlp_inputs(), path, min_swapped=3)
    assert tdom.fc1.transform is not None and tdom.fc1.transform.dtype == torch.float16 and tdom.fc1.k == 12
    assert tdom.fc2.layout == "in_out" and tdom.fc2.num_bands == 3
    # wide levels take a wider integer type
    path2 = tmp_path / "fine.tqz"
    path2.write_bytes(tq_file(mlp.state_dict(), {"fc1.weight": ("out_in", None, [-26, -60])}))
    _, t2 = _check_model(mlp, _mlp_inputs(), path2, min_swapped=1)
    assert t2.fc1._levels(0).dtype == torch.int8 and t2.fc1._levels(1).dtype == torch.int16


def test_conv_transforms(tmp_path, cnn):
    plan = {"c1.weight": ("out_in", 10, [-24, -28]),
            "c2.weight": ("out_in", 9, [-24, -26, -28]),   # grouped, k = 9 of m = 36
            "dw.weight": ("out_in", 5, [-26]),            # depthwise, m = 9
            "t1.weight": ("out_in", 20, [-26, -28]),
            "fc.weight": ("out_in", None, [-26, -28])}
    path = tmp_path / "c.tqz"
    path.write_bytes(tq_file(cnn.state_dict(), plan))
    dense, tdom = _check_model(cnn, _cnn_inputs(), path, min_swapped=5)
    assert all(getattr(tdom, n).transform is not None for n in ("c1", "c2", "dw", "t1"))


def test_blocks_smaller_than_bands(tmp_path, cnn, monkeypatch):
    """Levels cast block by block (blocks cut at group boundaries) give the same outputs."""
    monkeypatch.setattr(tqnn, "BLOCK_ELEMENTS", 40)
    plan = {"c1.weight": ("out_in", None, [-24, -28]), "c2.weight": ("out_in", None, [-24, -26, -28]),
            "dw.weight": ("out_in", None, [-26]), "t1.weight": ("out_in", 20, [-26, -28]),
            "fc.weight": ("out_in", None, [-26])}
    path = tmp_path / "b.tqz"
    path.write_bytes(tq_file(cnn.state_dict(), plan))
    _check_model(cnn, _cnn_inputs(), path, min_swapped=5)


def test_memory_held_is_integer_stage(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))
    path = tmp_path / "m.tqz"
    tqcodec.save(model.state_dict(), path, mode="tq", bits=3.0)
    dense, tdom = _counterparts(model, path)
    held = tqnn.resident_bytes(tdom)
    weights = 256 * 256 + 256 * 64
    assert held <= weights * 2 + 4 * (256 + 64)  # int8/int16 levels + fp32 biases
    assert held < 0.55 * tqnn.resident_bytes(dense)
    assert not any(isinstance(b, torch.Tensor) and b.is_floating_point() and b.numel() >= 256 * 64
                   for b in tdom.buffers())


def test_load_module_strict_and_shapes(tmp_path, mlp):
    path = tmp_path / "mlp.tqz"
    tqcodec.save(mlp.state_dict(), path, mode="tq")
    other = nn.Sequential(nn.Linear(24, 48))
    with pytest.raises(tqcodec.TqzError):
        tqcodec.load_module(other, path)
    sd = dict(mlp.state_dict())
    sd["fc1.weight"] = torch.randn(48, 25)
    bad = tmp_path / "bad.tqz"
    tqcodec.save(sd, bad, mode="tq")
    with pytest.raises(tqcodec.TqzError):
        tqcodec.load_module(copy.deepcopy(mlp), bad)
    # a dense weight that differs cannot be loaded into a transform-domain layer
    tdom = tqcodec.load_module(copy.deepcopy(mlp), path)
    changed = tdom.state_dict()
    changed["fc1.weight"] = changed["fc1.weight"] + 1
    with pytest.raises(RuntimeError):
        tdom.load_state_dict(changed)


def test_shared_submodule_swapped_everywhere(tmp_path):
    torch.manual_seed(4)
    lin = nn.Linear(64, 64)  # big enough that tq is smaller than raw float32 (else the tensor is stored raw)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    path = tmp_path / "s.tqz"
    tqcodec.save(model.state_dict(), path, mode="tq", quality=40)
    tdom = tqcodec.load_module(copy.deepcopy(model), path)
    assert isinstance(tdom[0], tqnn.TQLinear) and tdom[0] is tdom[2]
    dense = tqcodec.load_module(copy.deepcopy(model), path, transform_domain=False)
    x = torch.randn(8, 64)
    with torch.no_grad():
        assert torch.allclose(tdom(x), dense(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_input_dtypes(tmp_path, mlp, dtype):
    path = tmp_path / "d.tqz"
    path.write_bytes(tq_file(mlp.state_dict(), {"fc1.weight": ("out_in", None, [-26, -60]),
                                               "fc3.weight": ("out_in", 6, [-26])}))
    tdom = tqcodec.load_module(copy.deepcopy(mlp), path)
    x = _mlp_inputs().to(dtype)
    with torch.no_grad():
        for layer in (tdom.fc1, tdom.fc3):
            xin = x[:, :layer.in_features] if layer.in_features <= x.shape[1] else torch.randn(
                x.shape[0], layer.in_features, dtype=dtype)
            got = layer(xin)
            assert got.dtype == dtype
            want = F.linear(xin.double(), layer.dense_weight().double(), layer.bias.double())
            tol = 1e-12 if dtype == torch.float64 else 2e-2
            assert torch.allclose(got.double(), want, rtol=tol, atol=tol * float(want.abs().max()))


class Tok(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16, padding_idx=0)
        self.pos = nn.Embedding(12, 16)
        self.fc = nn.Linear(16, 50)

    def forward(self, ids):
        return self.fc(self.emb(ids) + self.pos(torch.arange(ids.shape[1]))[None])


def _tok_inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 50, (6, 12), generator=g)


@pytest.mark.parametrize("plan", [None,
                                  {"emb.weight": ("out_in", None, [-26, -27, -28, -29, -40]),
                                   "pos.weight": ("out_in", 8, [-26, -28])},
                                  {"emb.weight": ("in_out", None, [-26, -27, -28]),
                                   "pos.weight": ("in_out", 6, [-26])}])
def test_embeddings(tmp_path, plan):
    torch.manual_seed(6)
    model = Tok().eval()
    path = tmp_path / "e.tqz"
    ids = _tok_inputs()
    if plan is None:  # the encoder, with statistics (token counts: up to 64 row bands)
        stats = tqcodec.calibrate(model, [ids], sensitivity=False)
        tqcodec.save(model.state_dict(), path, mode="tq", stats=stats, bits=4.0)
    else:
        path.write_bytes(tq_file(model.state_dict(), plan))
    if plan is None:  # bands by token frequency (spec 1.4 row_band), not runs of ids
        with tqcodec.open(path) as f:
            assert f.parts("emb.weight")["row_band"] is not None
    dense, tdom = _check_model(model, ids, path, min_swapped=2)
    assert isinstance(tdom.emb, tqnn.TQEmbedding) and tdom.emb.padding_idx == 0
    with torch.no_grad():
        for name in ("emb", "pos"):
            layer, ref = getattr(tdom, name), getattr(dense, name)
            x = torch.arange(layer.num_embeddings).reshape(1, -1)
            got, want = layer(x), ref(x)
            if layer.transform is None:
                assert torch.equal(got, want)  # exact: the rows of C
            else:
                assert torch.allclose(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
        with pytest.raises(IndexError):
            tdom.emb(torch.tensor([[50]]))
