"""tqcodec.model.calibrate (tqcodec.calibrate and Stats): hooks, im2col statistics, embeddings,
save/load, from_activations, and Stats.open reading one layer at a time."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tqcodec
from tqcodec import api
from tqcodec.errors import TqzError
from tqcodec.model.calibrate import Stats, calibrate
from tests.helpers import toy_model


def _batches(x: torch.Tensor, size: int):
    return [x[i:i + size] for i in range(0, len(x), size)]


def test_linear_second_moment_matches_numpy():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(40, 5)
    st = calibrate(m, _batches(x, 16), sensitivity=False)
    xd = x.double().numpy()
    np.testing.assert_allclose(st.get("0.weight").h[0], xd.T @ xd / 40, rtol=1e-12, atol=1e-12)
    # the hook sees the layer's float32 input batch by batch (a float32 matmul's rounding may
    # depend on the batch size), so the expected value is built from the same batches
    hidden = torch.cat([torch.relu(m[0](b)) for b in _batches(x, 16)]).detach().double().numpy()
    np.testing.assert_allclose(st.get("2.weight").h[0], hidden.T @ hidden / 40, rtol=1e-10, atol=1e-12)
    assert st.get("0.weight").rows == 40


def test_max_samples_caps_rows():
    m = nn.Linear(4, 2)
    st = calibrate(m, _batches(torch.randn(100, 4), 30), max_samples=50, sensitivity=False)
    assert st.get("weight").rows == 50


def test_conv_stats_predict_output_error():
    """tr(E H E^T) from im2col statistics equals the conv's measured output error (linearity)."""
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 8, 3, padding=1, stride=2, groups=2, bias=False)
    x = torch.randn(10, 6, 9, 9, dtype=torch.float64)
    conv = conv.double()
    st = calibrate(conv, [x], sensitivity=False, views=False)  # the statistics of these inputs only
    s = st.get("weight")
    assert s.kind == "conv" and s.h.shape == (2, 27, 27)
    e = torch.randn_like(conv.weight) * 0.1
    y = F.conv2d(x, e, stride=2, padding=1, groups=2)  # output error of weight error e
    measured = float(y.pow(2).sum()) / (y.shape[0] * y.shape[2] * y.shape[3])
    from tqcodec.model.calibrate import local_distortion
    predicted = local_distortion(e.reshape(8, -1).numpy(), s)
    assert predicted == pytest.approx(measured, rel=1e-9)


def test_depthwise_and_conv1d_and_same_padding():
    m = nn.Sequential(nn.Conv1d(4, 4, 3, padding="same", groups=4), nn.Conv1d(4, 2, 2))
    st = calibrate(m, [torch.randn(3, 4, 11)], sensitivity=False)
    assert st.get("0.weight").h.shape == (4, 3, 3)
    assert st.get("1.weight").h.shape == (1, 8, 8)


def test_embedding_counts_and_dict_batches():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, ids, scale=1.0):
            return self.fc(self.emb(ids) * scale)

    m = M()
    ids = torch.tensor([[1, 2, 2], [3, 3, 3]])
    st = calibrate(m, [{"ids": ids, "scale": 2.0}, (ids,)], sensitivity=True)
    np.testing.assert_array_equal(st.get("emb.weight").counts[:4], [0, 2, 4, 6])
    assert st.get("fc.weight").rows == 12
    assert st.get("fc.bias").kind == "plain" and st.get("fc.bias").gain > 0
    assert st.output_power > 0


def test_embedding_column_metric_is_what_reaches_the_output():
    """An embedding's ``h`` is the second moment of the output gradient its rows receive: with a
    projection that passes only the first two of four columns on, errors in the other two reach
    nothing (exact zeros); scaled to a mean diagonal of 1; the same for the same inputs."""
    torch.manual_seed(3)
    m = nn.Sequential(nn.Embedding(20, 4), nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        m[1].weight.copy_(torch.tensor([[1.0, 0.5, 0, 0], [0.2, 2.0, 0, 0], [1.0, -1.0, 0, 0]]))
    ids = torch.randint(0, 20, (8, 5), generator=torch.Generator().manual_seed(1))
    st = calibrate(m, [ids[i:i + 2] for i in range(0, 8, 2)])
    h = st.get("0.weight").h
    assert st.get("0.weight").kind == "embedding" and h.shape == (1, 4, 4)
    assert np.all(h[0, 2:, :] == 0) and np.all(h[0, :, 2:] == 0)
    assert np.trace(h[0]) == pytest.approx(4.0) and np.all(np.diag(h[0])[:2] > 0)
    np.testing.assert_array_equal(h, calibrate(m, [ids[i:i + 2] for i in range(0, 8, 2)]).get("0.weight").h)
    assert calibrate(m, [ids], sensitivity=False).get("0.weight").h is None


def test_sensitivity_gain_reflects_downstream_scaling():
    """A layer followed by a x10 gain is ~100x more sensitive per unit of local error."""
    torch.manual_seed(2)
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = a, b

        def forward(self, x):
            return torch.cat([self.a(x) * 10.0, self.b(x)], dim=1)

    st = calibrate(M(), [torch.randn(64, 6)], sensitivity=True, sensitivity_method="perturb")
    assert st.get("a.weight").gain / st.get("b.weight").gain == pytest.approx(100.0, rel=1e-4)  # float32 forward
    # random-sign probes estimate the same expectation; 32 probe batches keep the noise small
    torch.manual_seed(3)
    st = calibrate(M(), [torch.randn(64, 6) for _ in range(32)], sensitivity_batches=32)
    assert st.get("a.weight").gain / st.get("b.weight").gain == pytest.approx(100.0, rel=0.2)


def test_probe_gains_agree_with_perturbation():
    """Both sensitivity methods measure the same gains (up to their sampling noise), for
    hooked weights, their biases and plain parameters (a LayerNorm)."""
    torch.manual_seed(4)
    m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 4))
    batches = [torch.randn(64, 8) for _ in range(16)]
    a = calibrate(m, batches, sensitivity_batches=16, sensitivity_method="probe")
    b = calibrate(m, batches, sensitivity_batches=16, sensitivity_method="perturb")
    for name in ("0.weight", "0.bias", "2.weight", "2.bias", "3.weight", "3.bias"):
        assert a.get(name).kind == b.get(name).kind
        assert 0.6 < a.get(name).gain / b.get(name).gain < 1.6, name
    assert a.get("0.bias").gain == a.get("0.weight").gain
    assert a.output_power == pytest.approx(b.output_power)


def test_attention_mask_leaves_padding_out():
    """Dict batches with an attention_mask: padded tokens count neither in H nor in the rows."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.fc = nn.Linear(4, 3)

        def forward(self, input_ids, attention_mask):
            return self.fc(self.emb(input_ids))

    torch.manual_seed(5)
    m = M()
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    st = calibrate(m, [{"input_ids": ids, "attention_mask": mask}], views=False)  # these two sequences only
    x = m.emb(ids)[mask.bool()].detach().double().numpy()
    assert st.get("fc.weight").rows == 5
    np.testing.assert_allclose(st.get("fc.weight").h[0], x.T @ x / 5, rtol=1e-12)
    assert st.get("emb.weight").counts[0] == 0 and st.get("emb.weight").counts[1] == 1


def test_shared_input_layers_get_identical_statistics():
    """Layers reading the same input tensor (query/key/value) share one computation."""
    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.q(x) + self.k(x) + self.v(x).sum(-1, keepdim=True)

    torch.manual_seed(6)
    x = torch.randn(3, 7, 6)
    st = calibrate(QKV(), [x, x * 2], sensitivity=False)
    xd = torch.cat([x, x * 2]).reshape(-1, 6).double().numpy()
    for n in ("q.weight", "k.weight", "v.weight"):
        np.testing.assert_allclose(st.get(n).h[0], xd.T @ xd / len(xd), rtol=1e-12)


def test_save_load_roundtrip(tmp_path):
    """precision float64 is lossless; the compact default keeps kinds, rows, layouts and gains
    exactly and H to float16 correlations (diagonal exact)."""
    m = nn.Sequential(nn.Conv2d(2, 3, 3, groups=1), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    st = calibrate(m, [torch.randn(4, 2, 6, 6)])
    for precision in ("float64", "compact"):
        p = tmp_path / f"s-{precision}.safetensors"
        st.save(str(p), precision=precision)
        back = tqcodec.Stats.load(str(p))
        assert sorted(back.keys()) == sorted(st.keys())
        for k in st.keys():
            a, b = st.get(k), back.get(k)
            assert (a.kind, a.rows, a.layout, a.gain) == (b.kind, b.rows, b.layout, b.gain)
            if a.h is None:
                assert b.h is None
            elif precision == "float64":
                np.testing.assert_array_equal(a.h, b.h)
                np.testing.assert_array_equal(a.mean, b.mean)
            else:
                np.testing.assert_allclose(np.diagonal(b.h, axis1=1, axis2=2), np.diagonal(a.h, axis1=1, axis2=2),
                                           rtol=1e-12)
                np.testing.assert_allclose(b.h, a.h, atol=2e-3 * np.abs(a.h).max())
        assert back.output_power == st.output_power
        assert b"pickle" not in p.read_bytes()[:64]


def test_from_activations_layouts():
    x = np.random.default_rng(0).normal(size=(20, 3))
    st = Stats.from_activations({"w": x, "v": torch.from_numpy(x)}, layouts={"v": "in_out"})
    np.testing.assert_allclose(st.get("w").h[0], x.T @ x / 20)
    assert st.get("v").layout == "in_out"
    with pytest.raises(ValueError):
        Stats.from_activations({"w": x}, layouts={"w": "sideways"})


# --- Stats.open: statistics read one layer at a time ------------------------------------------

def _toy_stats(sd: dict[str, torch.Tensor]) -> "tqcodec.Stats":
    """Statistics for the toy model's matrices from random activations (as for a non-torch model)."""
    g = torch.Generator().manual_seed(3)
    samples = {n: torch.randn(256, t.shape[1], generator=g) * torch.linspace(0.1, 2.0, t.shape[1])
               for n, t in sd.items() if n.endswith((".attn.weight", ".mlp.weight"))}
    return tqcodec.Stats.from_activations(samples)


def test_stats_open_reads_one_layer_at_a_time(tmp_path, monkeypatch):
    """Stats.open reads nothing but the metadata up front; a lookup reads that tensor's arrays
    only; the streaming encoder sends each task one layer's statistics, with the same bytes as
    eagerly loaded statistics and for every N of jobs."""
    from safetensors import safe_open

    sd = {k: v for k, v in toy_model().items()}
    path = tmp_path / "stats.safetensors"
    _toy_stats(sd).save(str(path))
    lazy = tqcodec.Stats.open(str(path))
    eager = tqcodec.Stats.load(str(path))
    assert sorted(lazy.tensors) == sorted(eager.tensors) and lazy.gains() == eager.gains()
    import numpy as np
    np.testing.assert_array_equal(lazy.tensors["layers.1.mlp.weight"].h, eager.tensors["layers.1.mlp.weight"].h)
    one = lazy.subset(["layers.0.attn.weight", "not.there"])
    assert list(one.tensors) == ["layers.0.attn.weight"] and isinstance(one.tensors, dict)
    sent = []
    real = api.EncodeOptions.for_tensor

    def spy(opts, name):
        out = real(opts, name)
        sent.append(len(out.stats.tensors))
        return out
    monkeypatch.setattr(api.EncodeOptions, "for_tensor", spy)
    kw = dict(mode="tq", bits=4, tq_scope="tensor")
    a = api.encode_bytes(sd, stats=lazy, **kw)
    assert sent and max(sent) <= 1  # no task carries more than its own layer's statistics
    assert api.encode_bytes(sd, stats=eager, **kw) == a
    assert api.encode_bytes(sd, stats=lazy, jobs=2, **kw) == a
    path.write_bytes(b"damaged")  # the file changes after it was opened: a clear error
    with pytest.raises(TqzError, match="statistics"):
        api.encode_bytes(sd, stats=lazy, **kw)
