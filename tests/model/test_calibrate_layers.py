"""tqcodec.model.calibrate on every common layer (issue 19): Conv1d/2d/3d (padding modes, same,
strides, dilations, groups), ConvTranspose1d/2d/3d (kind rows), LSTM/GRU/RNN (layer inputs and
previous hidden states recomputed, bidirectional, batch_first, unbatched, packed),
MultiheadAttention (packed in_proj with three groups, separate projections, out_proj's input,
key padding), Hugging Face Conv1D, TransformerEncoder, and the samples cap on each."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

from tqcodec.model.calibrate import calibrate, local_distortion


def _gram(x: torch.Tensor) -> np.ndarray:
    a = x.detach().reshape(-1, x.shape[-1]).double()
    return (a.T @ a / len(a)).numpy()


# --- convolutions ---------------------------------------------------------------------------

CONVS = [
    nn.Conv1d(4, 6, 3, stride=2, padding=2, padding_mode="replicate"),
    nn.Conv1d(4, 4, 3, padding="same", dilation=2, groups=4),
    nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), groups=2, padding_mode="reflect"),
    nn.Conv2d(4, 8, 3, padding="same", dilation=(1, 2)),
    nn.Conv3d(4, 6, 3, padding=1, groups=2, padding_mode="circular"),
    nn.Conv3d(4, 4, (1, 3, 2), stride=(1, 2, 1), groups=4),
]


@pytest.mark.parametrize("conv", CONVS, ids=lambda c: f"{type(c).__name__}-g{c.groups}-{c.padding_mode}")
def test_conv_stats_predict_the_output_error(conv):
    """tr(E H E^T) over the im2col statistics equals the conv's output error per position, for
    every padding mode, 'same', stride, dilation and group count (the conv is linear)."""
    torch.manual_seed(0)
    conv = conv.double()
    nd = len(conv.kernel_size)
    x = torch.randn(3, 4, *([7] * nd), dtype=torch.float64)
    s = calibrate(conv, [x[:2], x[2:]], sensitivity=False, views=False).get("weight")
    y = conv(x)
    assert s.kind == "conv" and s.h.shape[0] == conv.groups
    assert s.rows == y.numel() // y.shape[1]  # positions seen: batch x output positions
    e = torch.randn_like(conv.weight) * 0.1
    ye = conv._conv_forward(x, e, None)  # output error of the weight error e (linearity)
    measured = float(ye.pow(2).sum()) / s.rows
    assert local_distortion(e.reshape(e.shape[0], -1).numpy(), s) == pytest.approx(measured, rel=1e-9)


def test_unbatched_conv_input():
    conv = nn.Conv2d(2, 3, 3)
    x = torch.randn(2, 5, 5)
    s = calibrate(conv, [x], sensitivity=False).get("weight")
    assert s.rows == 9 and s.h.shape == (1, 18, 18)


@pytest.mark.parametrize("cls,nd", [(nn.ConvTranspose1d, 1), (nn.ConvTranspose2d, 2), (nn.ConvTranspose3d, 3)])
def test_transposed_conv_has_row_statistics(cls, nd):
    """ConvTranspose weights [in, out/g, k...]: kind rows with E[x_c^2] per input channel; for
    an error in one row (one input channel) and stride = kernel (no overlap), the predicted
    distortion is exact."""
    torch.manual_seed(1)
    ct = cls(4, 6, 2, stride=2, groups=2).double()
    x = torch.randn(3, 4, *([3] * nd), dtype=torch.float64) * torch.tensor([1.0, 0.0, 3.0, 0.5],
                                                                           dtype=torch.float64).reshape(1, 4, *[1] * nd)
    st = calibrate(ct, [x], sensitivity=True)
    s = st.get("weight")
    assert s.kind == "rows" and s.h is None and s.rows == 3 * 3 ** nd
    want = x.transpose(0, 1).reshape(4, -1).pow(2).mean(1).numpy()
    np.testing.assert_allclose(s.row_h, want, rtol=1e-12)
    assert s.row_h[1] == 0  # a dead input channel
    e = torch.zeros_like(ct.weight)
    e[2] = torch.randn_like(ct.weight[2])
    ye = F.conv_transpose2d if nd == 2 else (F.conv_transpose1d if nd == 1 else F.conv_transpose3d)
    out = ye(x, e, stride=2, groups=2)
    measured = float(out.pow(2).sum()) / s.rows
    assert local_distortion(e.reshape(4, -1).numpy(), s) == pytest.approx(measured, rel=1e-9)
    assert st.get("bias").kind == "plain" and st.get("bias").gain > 0  # measured, not the weight's


# --- recurrent layers -------------------------------------------------------------------------

class Recurrent(nn.Module):
    def __init__(self, cls, batch_first: bool, bidirectional: bool, **kw):
        super().__init__()
        self.r = cls(5, 7, num_layers=2, batch_first=batch_first, bidirectional=bidirectional, **kw)

    def forward(self, x):
        return self.r(x)[0]


def _layer_by_layer(rnn: nn.RNNBase, x: torch.Tensor) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """(input, [output per direction]) of each layer, [B, T, .], with one-layer modules of the same class."""
    seq = x if rnn.batch_first else x.transpose(0, 1)
    dirs = 2 if rnn.bidirectional else 1
    out = []
    for k in range(rnn.num_layers):
        one = type(rnn)(seq.shape[-1], rnn.hidden_size, batch_first=True, bidirectional=rnn.bidirectional)
        one.load_state_dict({n.replace(f"_l{k}", "_l0"): v for n, v in rnn.state_dict().items() if f"_l{k}" in n})
        with torch.no_grad():
            y = one(seq)[0]
        out.append((seq, [y[..., d * rnn.hidden_size:(d + 1) * rnn.hidden_size] for d in range(dirs)]))
        seq = y
    return out


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("batch_first,bidirectional", [(True, True), (False, False), (False, True)])
def test_recurrent_layers_inputs_and_previous_states(cls, batch_first, bidirectional):
    """weight_ih_l{k}: H of layer k's input sequence; weight_hh_l{k}: H of the previous hidden
    states (the zero initial state, then the outputs before the last step; reversed for the
    reverse direction); both over T x B samples."""
    torch.manual_seed(2)
    m = Recurrent(cls, batch_first, bidirectional)
    x = torch.randn(4, 6, 5) if batch_first else torch.randn(6, 4, 5)
    st = calibrate(m, [x], sensitivity=True)
    for k, (inp, outs) in enumerate(_layer_by_layer(m.r, x)):
        for d, o in enumerate(outs):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            ih, hh = st.get(f"r.weight_ih{sfx}"), st.get(f"r.weight_hh{sfx}")
            assert ih.kind == hh.kind == "linear" and ih.rows == hh.rows == 24
            np.testing.assert_allclose(ih.h[0], _gram(inp), rtol=1e-6, atol=1e-9)
            zero = torch.zeros(o.shape[0], 1, o.shape[2])
            prev = torch.cat([zero, o[:, :-1]], 1) if d == 0 else torch.cat([zero, o[:, 1:]], 1)
            np.testing.assert_allclose(hh.h[0], _gram(prev), rtol=1e-5, atol=1e-8)
            assert st.get(f"r.bias_ih{sfx}").gain > 0
    if bidirectional:  # both directions read the layer's input: one shared array
        assert st.get("r.weight_ih_l1").h is st.get("r.weight_ih_l1_reverse").h


def test_recurrent_initial_state_and_unbatched_input():
    """A given initial state is the first previous state; an unbatched [T, F] input works."""
    torch.manual_seed(3)
    rnn = nn.GRU(3, 4)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = rnn

        def forward(self, x, h0):
            return self.g(x, h0)[0]
    x, h0 = torch.randn(5, 2, 3), torch.randn(1, 2, 4)
    s = calibrate(M(), [(x, h0)], sensitivity=False).get("g.weight_hh_l0")
    with torch.no_grad():
        y = rnn(x, h0)[0]
    np.testing.assert_allclose(s.h[0], _gram(torch.cat([h0, y[:-1]])), rtol=1e-6, atol=1e-9)
    s = calibrate(M(), [(x[:, 0], h0[:, 0])], sensitivity=False).get("g.weight_hh_l0")
    assert s.rows == 5


def test_packed_sequences():
    """Packed input: only real steps count; each sequence's previous states are its own."""
    torch.manual_seed(4)
    lstm = nn.LSTM(3, 4, bidirectional=True)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = lstm

        def forward(self, x, lengths):
            return self.l(pack_padded_sequence(x, lengths, enforce_sorted=False))[0].data

    x, lengths = torch.randn(5, 3, 3), torch.tensor([2, 5, 3])
    st = calibrate(M(), [(x, lengths)], sensitivity=True)
    assert st.get("l.weight_ih_l0").rows == st.get("l.weight_hh_l0_reverse").rows == 10
    fwd, rev = [], []
    with torch.no_grad():
        for b in range(3):
            y = lstm(x[:lengths[b], b:b + 1])[0][:, 0]  # one sequence alone
            fwd += [torch.zeros(1, 4), y[:-1, :4]]
            rev += [torch.zeros(1, 4), y[1:, 4:]]
    np.testing.assert_allclose(st.get("l.weight_hh_l0").h[0], _gram(torch.cat(fwd)), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(st.get("l.weight_hh_l0_reverse").h[0], _gram(torch.cat(rev)), rtol=1e-5, atol=1e-8)
    real = torch.cat([x[:lengths[b], b] for b in range(3)])
    np.testing.assert_allclose(st.get("l.weight_ih_l0").h[0], _gram(real), rtol=1e-6, atol=1e-9)


def test_recurrent_rows_cap():
    m = Recurrent(nn.LSTM, True, True)
    st = calibrate(m, [torch.randn(4, 6, 5)] * 3, max_samples=50, sensitivity=False)
    assert {st.get(n).rows for n in st.keys()} == {50}


# --- attention --------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    def __init__(self, batch_first: bool = True, **kw):
        super().__init__()
        self.a = nn.MultiheadAttention(8, 2, batch_first=batch_first, **kw)

    def forward(self, x, key_padding_mask=None):
        return self.a(x, x, x, key_padding_mask=key_padding_mask)[0]


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_in_proj_groups_and_out_proj_input(batch_first):
    """in_proj_weight [3E, E]: h [3, E, E], the three groups the query/key/value input (one
    for self-attention); out_proj.weight: the attention output before out_proj, whose H
    predicts the MHA's output error for an out_proj weight error exactly."""
    torch.manual_seed(5)
    m = SelfAttention(batch_first).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    st = calibrate(m, [x], sensitivity=True)
    s = st.get("a.in_proj_weight")
    assert s.kind == "linear" and s.h.shape == (3, 8, 8) and s.rows == 15
    for g in range(3):
        np.testing.assert_allclose(s.h[g], _gram(x), rtol=1e-12)
    assert st.get("a.in_proj_bias").gain == s.gain > 0
    o = st.get("a.out_proj.weight")
    assert o.rows == 15 and o.gain > 0
    e = torch.randn(8, 8, dtype=torch.float64) * 0.01
    with torch.no_grad():
        y0 = m(x)
        m.a.out_proj.weight += e
        y1 = m(x)
    measured = float((y1 - y0).pow(2).sum()) / 15
    assert local_distortion(e.numpy(), o) == pytest.approx(measured, rel=1e-6)


def test_cross_attention_groups_and_key_padding():
    """Query, key and value inputs differ: three different groups; padded keys are left out of
    the key and value groups (rows: the smallest group's count)."""
    torch.manual_seed(6)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = mha

        def forward(self, q, kv, mask):
            return self.a(q, kv, kv * 2, key_padding_mask=mask)[0]
    q, kv = torch.randn(2, 5, 8), torch.randn(2, 4, 8)
    mask = torch.tensor([[False, False, True, True], [False, False, False, False]])
    s = calibrate(Cross(), [(q, kv, mask)], sensitivity=False).get("a.in_proj_weight")
    keep = kv[~mask]
    np.testing.assert_allclose(s.h[0], _gram(q), rtol=1e-6)
    np.testing.assert_allclose(s.h[1], _gram(keep), rtol=1e-6)
    np.testing.assert_allclose(s.h[2], _gram(keep * 2), rtol=1e-6)
    assert s.rows == 6  # 6 kept keys, 10 queries: the smallest group's count
    st = calibrate(SelfAttention(), [(torch.randn(2, 4, 8), mask)], sensitivity=False)
    assert st.get("a.in_proj_weight").rows == st.get("a.out_proj.weight").rows == 6


def test_attention_with_separate_projections():
    torch.manual_seed(7)
    mha = nn.MultiheadAttention(8, 2, kdim=5, vdim=3)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = mha

        def forward(self, q, k, v):
            return self.a(q, k, v)[0]
    q, k, v = torch.randn(4, 2, 8), torch.randn(6, 2, 5), torch.randn(6, 2, 3)
    st = calibrate(M(), [(q, k, v)], sensitivity=True)
    for n, x in (("q", q), ("k", k), ("v", v)):
        s = st.get(f"a.{n}_proj_weight")
        np.testing.assert_allclose(s.h[0], _gram(x), rtol=1e-6)
        assert s.gain > 0
    assert st.get("a.out_proj.weight").rows == 8


def test_transformer_encoder_layers_are_seen_and_modes_restored():
    """The fused fast path would skip the hooks: every linear layer and attention gets statistics,
    and the module's training mode is restored after."""
    torch.manual_seed(8)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2, enable_nested_tensor=False)
    enc.train()
    x = torch.randn(3, 5, 8)
    st = calibrate(enc, [x])
    for k in range(2):
        for n in ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight"):
            assert st.get(f"layers.{k}.{n}").rows == 15, n
    assert enc.training and all(m.training for m in enc.modules())


def test_hugging_face_conv1d_is_linear_in_out():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(9)
    m = nn.Sequential(Conv1D(6, 4), nn.Tanh(), Conv1D(2, 6))  # weights [in, out]
    x = torch.randn(3, 5, 4)
    st = calibrate(m, [x], sensitivity=True, sensitivity_batches=1)
    s = st.get("0.weight")
    assert s.kind == "linear" and s.layout == "in_out" and s.h.shape == (1, 4, 4) and s.rows == 15
    np.testing.assert_allclose(s.h[0], _gram(x), rtol=1e-6)
    a = calibrate(m, [x] * 16, sensitivity_batches=16, seed=1)
    b = calibrate(m, [x] * 2, sensitivity_batches=2, sensitivity_method="perturb")
    assert 0.5 < a.get("0.weight").gain / b.get("0.weight").gain < 2  # the same units both ways


def test_samples_cap_on_every_kind():
    torch.manual_seed(10)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ConvTranspose2d(4, 2, 2, stride=2), nn.Flatten(),
                      nn.Linear(2 * 12 * 12, 3))
    st = calibrate(m, [torch.randn(4, 2, 6, 6)] * 3, max_samples=100, sensitivity=False, views=False)
    assert st.get("0.weight").rows == st.get("1.weight").rows == 100
    assert st.get("3.weight").rows == 12
    with pytest.raises(ValueError):
        calibrate(m, [torch.randn(1, 2, 6, 6)], max_samples=0)
