"""tqcodec.model.nn, issue 16 (fast transform-domain layers): C widened into a shared scratch
buffer, one call per layer. What is asserted is behaviour, never timing: every layer type and
layout equals a dense layer with the decoded weight (bit for bit where the dense layer's own call
is made, within spec §7.5.3's tolerance with a transform), row blocks and runs of bands of mixed
integer types, no dense float weight held after a forward (``resident_bytes``), the scratch
buffer shared and never aliased by an output, autograd and inference mode, threads."""
from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tqcodec
from tqcodec.model import nn as tqnn
from tests.helpers import tq_file


def _swapped(model: nn.Module, plan: dict, tmp_path) -> tuple[nn.Module, dict]:
    path = tmp_path / "m.tqz"
    path.write_bytes(tq_file(model.state_dict(), plan))
    tdom = tqcodec.load_module(copy.deepcopy(model), path).eval()
    return tdom, tqcodec.load(path)


# codes: -26 -> int8 levels here, -60 -> int16/int32 (a fine step): bands of mixed integer types
MIXED = [-26, -60, -27, -28]
FINE = [-56]


def _abs_weight(layer: nn.Module) -> torch.Tensor:
    """sum_r |S[j, r] C[r, i]| (or |W|) in the weight's shape (the spec's tolerance term)."""
    c = np.concatenate([np.abs(layer._levels(b).numpy().astype(np.float64)) * layer.band_steps[b]
                        for b in range(layer.num_bands)])
    r = c if layer.transform is None else (np.abs(layer.transform.numpy().astype(np.float64)) @ c).T
    if layer.layout == "in_out":
        r = r.T
    return torch.from_numpy(np.ascontiguousarray(r)).float().reshape(layer.weight_shape)


def _dense_call(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, bias) -> torch.Tensor:
    if isinstance(layer, tqnn.TQLinear):
        return F.linear(x, w, bias)
    conv = F.conv1d if isinstance(layer, tqnn.TQConv1d) else F.conv2d
    pad = layer.padding
    if layer.padding_mode != "zeros":
        x, pad = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), 0
    return conv(x, w, bias, layer.stride, pad, layer.dilation, layer.groups)


def _check(layer: nn.Module, x: torch.Tensor, exact: bool) -> torch.Tensor:
    """The layer's output against the dense layer with the decoded weight: bit for bit
    (``exact``) or within 2^-20 of sum |S C| per weight plus float32 summation error."""
    w = layer.dense_weight()
    with torch.no_grad():
        got = layer(x)
        if isinstance(layer, tqnn.TQEmbedding):
            want = F.embedding(x, w)
            scale = F.embedding(x, _abs_weight(layer))
            terms = layer.k + 4
        else:
            want = _dense_call(layer, x, w, layer.bias)
            scale = _dense_call(layer, x.abs(), _abs_weight(layer), None if layer.bias is None else layer.bias.abs())
            terms = layer.m + layer.k + 4
    assert got.shape == want.shape and got.dtype == want.dtype
    if exact:
        assert torch.equal(got, want), float((got - want).abs().max())
    else:
        bound = (2.0 ** -20 + 2 * terms * 2.0 ** -24) * scale + 1e-30
        assert torch.all((got - want).abs() <= bound), float(((got - want).abs() / bound).max())
    return got


def _held_floats(layer: nn.Module) -> list:
    """Every floating tensor the layer holds (parameters, buffers, plain attributes) with at least
    as many elements as one output channel's share of the weight times the rows: anything of the
    dense weight's size."""
    numel = int(np.prod(layer.weight_shape))
    out = []
    for t in list(layer.parameters()) + list(layer.buffers()) + [v for v in vars(layer).values()
                                                                  if isinstance(v, torch.Tensor)]:
        if t.is_floating_point() and t.numel() >= numel and t is not layer.transform:
            out.append(tuple(t.shape))
    return out


def _expected_bytes(layer: nn.Module) -> int:
    """Levels (each band once, its narrow type), the steps (float32: one per row of C when they
    differ, else one), the float16 transform and the bias: what the layer may hold."""
    total = sum(layer._levels(b).numel() * layer._levels(b).element_size() for b in range(layer.num_bands))
    total += 4 * (layer.k if len(set(layer.band_steps)) > 1 else 1)
    if layer.transform is not None:
        total += layer.transform.numel() * 2
    if layer.bias is not None:
        total += layer.bias.numel() * layer.bias.element_size()
    return total


def _check_held(layer: nn.Module, x: torch.Tensor) -> None:
    before = tqnn.resident_bytes(layer)
    assert before == _expected_bytes(layer)
    with torch.no_grad():
        layer(x)
    assert tqnn.resident_bytes(layer) == before
    assert _held_floats(layer) == []


# --- models ------------------------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(40, 64)
        self.b = nn.Linear(64, 48, bias=False)
        self.c = nn.Linear(48, 64)
        self.d = nn.Linear(64, 40)

    def forward(self, x):
        return self.d(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))))


LINEAR_PLANS = {
    "out_in": {n: ("out_in", None, MIXED) for n in ("a.weight", "b.weight", "c.weight", "d.weight")},
    "in_out": {n: ("in_out", None, MIXED) for n in ("a.weight", "b.weight", "c.weight", "d.weight")},
    "out_in_transform": {"a.weight": ("out_in", 24, MIXED), "b.weight": ("out_in", 30, [-26]),
                         "c.weight": ("out_in", 16, FINE), "d.weight": ("out_in", 40, [-26, -28])},
    "in_out_transform": {"a.weight": ("in_out", 24, MIXED), "b.weight": ("in_out", 30, [-26]),
                         "c.weight": ("in_out", 16, FINE), "d.weight": ("in_out", 40, [-26, -28])},
}


@pytest.mark.parametrize("plan", sorted(LINEAR_PLANS))
def test_linear_equals_dense_decode(tmp_path, plan):
    torch.manual_seed(10)
    model = MLP().eval()
    tdom, ref = _swapped(model, LINEAR_PLANS[plan], tmp_path)
    x = torch.randn(7, 40)
    exact = plan == "out_in"  # F.linear with the decoded weight itself
    h = x
    for name in ("a", "b", "c", "d"):
        layer = getattr(tdom, name)
        assert isinstance(layer, tqnn.TQLinear)
        assert torch.equal(layer.dense_weight(), ref[f"{name}.weight"])
        h = torch.tanh(_check(layer, h, exact))
        _check_held(layer, h.detach()[:, :layer.in_features] if h.shape[1] >= layer.in_features
                    else torch.randn(3, layer.in_features))
    # three-dimensional input and the whole model
    _check(tdom.a, torch.randn(2, 5, 40), exact)
    dense = tqcodec.load_module(copy.deepcopy(model), tmp_path / "m.tqz", transform_domain=False).eval()
    with torch.no_grad():
        yd, yt = dense(x), tdom(x)
    if exact:
        assert torch.equal(yt, yd)
    else:
        assert torch.allclose(yt, yd, rtol=1e-4, atol=1e-5 * float(yd.abs().max()))


def test_runs_of_bands(tmp_path):
    """Neighbouring bands of one integer type are one tensor; each band is a view of it with
    its own dtype and levels, and the per-row step column holds every band's exact step (a
    one-band layer: its step alone, a 0-dim tensor)."""
    torch.manual_seed(11)
    model = MLP().eval()
    codes = [-26, -27, -60, -61, -28, -26]
    tdom, _ = _swapped(model, {"a.weight": ("out_in", None, codes), "b.weight": ("out_in", None, [-27])}, tmp_path)
    layer = tdom.a
    dts = [layer._levels(b).dtype for b in range(layer.num_bands)]
    assert dts[0] == dts[1] == dts[4] == dts[5] == torch.int8 and dts[2] != torch.int8 and dts[3] == dts[2]
    runs = [name for name, _ in layer.named_buffers() if name.startswith("levels_")]
    assert len(runs) == 3
    with tqcodec.open(tmp_path / "m.tqz") as f:
        parts = f.get_parts("a.weight")
    for b in range(layer.num_bands):
        assert np.array_equal(layer._levels(b).numpy(), parts["levels"][b])
        assert layer._levels(b).untyped_storage().data_ptr() in {
            buf.untyped_storage().data_ptr() for name, buf in layer.named_buffers() if name.startswith("levels_")}
    col = layer.steps[:, 0].double().numpy()
    assert np.array_equal(col, np.repeat(parts["steps"], parts["band_rows"]))
    _check(layer, torch.randn(5, 40), exact=True)
    _check_held(layer, torch.randn(5, 40))
    for conv in (torch.float16, torch.bfloat16, torch.float64):  # module casts keep every step exact
        layer.to(conv)
        assert np.array_equal(layer.steps[:, 0].double().numpy(), col)
        assert all(layer._levels(b).dtype == dts[b] for b in range(layer.num_bands))
    layer.float()
    _check(layer, torch.randn(5, 40), exact=True)
    one = tdom.b  # one band: its step alone
    assert one.num_bands == 1 and one.steps.dim() == 0 and float(one.steps) == one.band_steps[0]
    one.half()
    assert one.steps.dtype == torch.float32 and float(one.steps) == one.band_steps[0]
    one.float()
    _check(one, torch.randn(5, 64), exact=True)
    _check_held(one, torch.randn(5, 64))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=4)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False, padding_mode="reflect")
        self.t1 = nn.Conv1d(32, 24, 3, padding=2, dilation=2, groups=2)
        self.t2 = nn.Conv1d(24, 12, 1, padding_mode="circular")

    def forward(self, x):
        h = torch.relu(self.dw(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.t2(torch.relu(self.t1(h.flatten(2))))


CONV_PLANS = {
    "plain": {"c1.weight": ("out_in", None, MIXED), "c2.weight": ("out_in", None, [-26, -60, -27]),
              "dw.weight": ("out_in", None, [-26]), "t1.weight": ("out_in", None, MIXED),
              "t2.weight": ("out_in", None, FINE)},
    "transform": {"c1.weight": ("out_in", 10, MIXED), "c2.weight": ("out_in", 9, [-24, -60, -28]),
                  "dw.weight": ("out_in", 5, [-26]), "t1.weight": ("out_in", 20, [-26, -28]),
                  "t2.weight": ("out_in", 12, FINE)},
}


def _conv_inputs(tdom: nn.Module, x: torch.Tensor) -> dict:
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=name: seen.setdefault(name, inp[0]))
             for name, m in tdom.named_modules() if isinstance(m, tqnn._TQBase)]
    with torch.no_grad():
        tdom(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("plan", sorted(CONV_PLANS))
def test_conv_equals_dense_decode(tmp_path, plan):
    torch.manual_seed(12)
    model = CNN().eval()
    tdom, _ = _swapped(model, CONV_PLANS[plan], tmp_path)
    inputs = _conv_inputs(tdom, torch.randn(2, 3, 10, 10))
    assert sorted(inputs) == ["c1", "c2", "dw", "t1", "t2"]
    for name, x in inputs.items():
        layer = getattr(tdom, name)
        assert isinstance(layer, tqnn.TQConv2d if name in ("c1", "c2", "dw") else tqnn.TQConv1d)
        _check(layer, x, exact=plan == "plain")  # no transform: the dense layer's own call
        _check_held(layer, x)


def test_row_blocks(tmp_path, monkeypatch):
    """Layers larger than BLOCK_ELEMENTS are widened and computed in row blocks (conv blocks cut
    at group boundaries): the same outputs, within float rounding."""
    torch.manual_seed(13)
    cnn, mlp = CNN().eval(), MLP().eval()
    monkeypatch.setattr(tqnn, "BLOCK_ELEMENTS", 100)
    tqnn.release_scratch()
    c_block, s_size = 0, 0  # most coefficients widened at once (whole rows: >= 1 row), largest S
    for model, plan, x in ((cnn, CONV_PLANS["plain"], torch.randn(2, 3, 10, 10)),
                           (cnn, CONV_PLANS["transform"], torch.randn(2, 3, 10, 10)),
                           (mlp, LINEAR_PLANS["out_in"], None), (mlp, LINEAR_PLANS["in_out"], None),
                           (mlp, LINEAR_PLANS["out_in_transform"], None),
                           (mlp, LINEAR_PLANS["in_out_transform"], None)):
        tdom, _ = _swapped(model, plan, tmp_path)
        layers = (_conv_inputs(tdom, x) if x is not None else
                  {n: torch.randn(4, getattr(tdom, n).in_features) for n in ("a", "b", "c", "d")})
        for name, inp in layers.items():
            layer = getattr(tdom, name)
            assert not layer._whole()
            _check(layer, inp, exact=False)
            _check_held(layer, inp)
            c_block = max(c_block, max(1, 100 // layer.cols) * layer.cols)
            s_size = max(s_size, 0 if layer.transform is None else layer.transform.numel())
    assert c_block <= 100 and tqnn.scratch_bytes() <= 4 * (c_block + s_size)  # C in blocks (+ S)


class Tok(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(60, 16, padding_idx=0)
        self.pos = nn.Embedding(12, 16)

    def forward(self, ids):
        return self.emb(ids) + self.pos(torch.arange(ids.shape[1]))[None]


EMB_PLANS = {  # entries ~N(0, 1): -48 is a step of 2^-12, int16 levels
    "out_in": {"emb.weight": ("out_in", None, [-26, -48, -27, -28, -26]), "pos.weight": ("out_in", None, [-48])},
    "in_out": {"emb.weight": ("in_out", None, [-26, -48, -27]), "pos.weight": ("in_out", None, [-26])},
    "out_in_transform": {"emb.weight": ("out_in", 10, [-26, -48]), "pos.weight": ("out_in", 8, [-26])},
    "in_out_transform": {"emb.weight": ("in_out", 12, [-26, -48]), "pos.weight": ("in_out", 6, [-26])},
}


@pytest.mark.parametrize("plan", sorted(EMB_PLANS))
def test_embedding_equals_dense_decode(tmp_path, plan):
    torch.manual_seed(14)
    model = Tok().eval()
    tdom, _ = _swapped(model, EMB_PLANS[plan], tmp_path)
    g = torch.Generator().manual_seed(3)
    for name, n in (("emb", 60), ("pos", 12)):
        layer = getattr(tdom, name)
        assert isinstance(layer, tqnn.TQEmbedding)
        for ids in (torch.randint(0, n, (4, 9), generator=g), torch.arange(n).reshape(1, -1),
                    torch.tensor([n - 1, 0, n - 1, 3])):
            _check(layer, ids, exact="transform" not in plan)  # no transform: the rows of C themselves
        _check_held(layer, torch.arange(n))


def test_scratch_shared_and_never_aliased(tmp_path):
    """One buffer serves every layer of a thread (the largest C seen); an output never lives in
    it, so a later layer's forward leaves earlier outputs unchanged; release_scratch frees it."""
    torch.manual_seed(15)
    model = MLP().eval()
    tdom, _ = _swapped(model, LINEAR_PLANS["out_in"], tmp_path)
    tqnn.release_scratch()
    assert tqnn.scratch_bytes() == 0
    xa, xd = torch.randn(5, 40), torch.randn(5, 64)
    with torch.no_grad():
        ya = tdom.a(xa)  # C [64, 40]
        ya_copy = ya.clone()
        assert tqnn.scratch_bytes() == 4 * 64 * 40
        yd = tdom.d(xd)  # C [40, 64]: as many coefficients, the same buffer overwritten
        assert tqnn.scratch_bytes() == 4 * 64 * 40
        assert torch.equal(ya, ya_copy)
        assert torch.equal(tdom.a(xa), ya_copy) and torch.equal(tdom.d(xd), yd)
        tdom.c(torch.randn(2, 48))  # larger (64 x 48): the buffer grows to it
        assert tqnn.scratch_bytes() == 4 * 64 * 48
        assert torch.equal(tdom.a(xa), ya_copy)
        tdom.a(xa.double())  # float64 compute: its own buffer
        assert tqnn.scratch_bytes() == 4 * 64 * 48 + 8 * 64 * 40
    for layer in (tdom.a, tdom.c, tdom.d):
        assert _held_floats(layer) == []
    tqnn.release_scratch()
    assert tqnn.scratch_bytes() == 0
    with torch.no_grad():
        assert torch.equal(tdom.a(xa), ya_copy)


def test_autograd_never_sees_the_shared_buffer(tmp_path):
    """With grad on, the widened weight autograd keeps is a fresh tensor: running other layers
    before backward changes nothing, and the gradients equal the dense layer's."""
    torch.manual_seed(16)
    model = MLP().eval()
    for plan in ("out_in", "in_out_transform"):
        tdom, _ = _swapped(model, LINEAR_PLANS[plan], tmp_path)
        dense = tqcodec.load_module(copy.deepcopy(model), tmp_path / "m.tqz", transform_domain=False).eval()
        x = torch.randn(6, 40, requires_grad=True)
        y = tdom.a(x)
        with torch.no_grad():
            tdom.c(torch.randn(3, 48))  # fills the shared buffer with other coefficients
        tdom.d(torch.randn(3, 64, requires_grad=True)).sum().backward()
        (y * torch.linspace(-1, 1, 64)).sum().backward()
        xd = x.detach().clone().requires_grad_(True)
        (dense.a(xd) * torch.linspace(-1, 1, 64)).sum().backward()
        assert torch.allclose(x.grad, xd.grad, rtol=1e-5, atol=1e-6 * float(xd.grad.abs().max()))
        assert torch.allclose(tdom.a.bias.grad, dense.a.bias.grad, rtol=1e-6, atol=1e-7)


def test_inference_mode_and_back(tmp_path):
    torch.manual_seed(17)
    model = CNN().eval()
    tdom, _ = _swapped(model, CONV_PLANS["plain"], tmp_path)
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        want = tdom(x)
    with torch.inference_mode():
        assert torch.equal(tdom(x), want)
    with torch.no_grad():
        assert torch.equal(tdom(x), want)
    with torch.inference_mode():
        assert torch.equal(tdom(x), want)


def test_input_dtypes(tmp_path):
    torch.manual_seed(18)
    model = MLP().eval()
    tdom, _ = _swapped(model, LINEAR_PLANS["out_in"], tmp_path)
    x = torch.randn(5, 40, dtype=torch.float64)
    layer = tdom.a
    with torch.no_grad():
        got = layer(x)  # float64 compute: the decoded weight widened exactly
        assert got.dtype == torch.float64
        assert torch.equal(got, F.linear(x, layer.dense_weight().double(), layer.bias.double()))
        xb = x.to(torch.bfloat16)
        got = layer(xb)  # narrower inputs compute in float32, the output cast back
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, F.linear(xb.float(), layer.dense_weight(), layer.bias).to(torch.bfloat16))


def test_threads_have_their_own_buffers(tmp_path):
    torch.manual_seed(19)
    model = MLP().eval()
    tdom, _ = _swapped(model, LINEAR_PLANS["out_in"], tmp_path)
    xs = [torch.randn(9, 40) for _ in range(4)]
    with torch.no_grad():
        want = [tdom(x) for x in xs]
    errors: list = []

    def work(i: int) -> None:
        try:
            with torch.no_grad():
                for _ in range(30):
                    if not torch.equal(tdom(xs[i]), want[i]):
                        errors.append(i)
                        return
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_memory_held_by_a_model(tmp_path):
    """A model from the real encoder: what it holds is levels, steps and biases, well under the
    fp32 model, also after forwards; the scratch buffer is one largest layer in float32."""
    torch.manual_seed(20)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    path = tmp_path / "m.tqz"
    tqcodec.save(model.state_dict(), path, mode="tq", bits=3.0)
    tdom = tqcodec.load_module(copy.deepcopy(model), path).eval()
    dense = tqcodec.load_module(copy.deepcopy(model), path, transform_domain=False).eval()
    held = tqnn.resident_bytes(tdom)
    tqnn.release_scratch()
    x = torch.randn(16, 256)
    with torch.no_grad():
        assert torch.equal(tdom(x), dense(x))
    assert tqnn.resident_bytes(tdom) == held
    assert held < 0.4 * tqnn.resident_bytes(dense)
    assert tqnn.scratch_bytes() == 4 * 256 * 256
    for layer in (tdom[0], tdom[2], tdom[4]):
        assert isinstance(layer, tqnn.TQLinear) and _held_floats(layer) == []
        assert tqnn.resident_bytes(layer) == _expected_bytes(layer)
