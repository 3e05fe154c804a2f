"""tqcodec.model.calibrate: sensitivity from every output (issue 19): nested outputs flattened,
each output scaled by its own magnitude, a second head changing the gains and the tq file's
bits; degenerate inputs (NaN, failing forwards, zeros) refused or handled; determinism."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn

import tqcodec
from tqcodec.errors import TqzError
from tqcodec.model.calibrate import calibrate, output_tensors


def test_output_tensors_walks_nested_outputs():
    a, b, c, d = (torch.randn(2, 3) for _ in range(4))

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor
        extra: tuple

    out = {"x": [a, (b, torch.arange(3))], "y": Out(c, (d, None, "text", a)), "z": 3.0}
    got = output_tensors(out)
    assert len(got) == 4 and all(g is t for g, t in zip(got, (a, b, c, d)))  # a met twice counts once
    assert output_tensors(torch.zeros(0)) == [] and output_tensors(torch.arange(4)) == []


def test_transformers_model_output_is_flattened():
    pytest.importorskip("transformers")
    from transformers.modeling_outputs import BaseModelOutput

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.a(x)
            return BaseModelOutput(last_hidden_state=self.b(h), hidden_states=(x, h))

    torch.manual_seed(0)
    st = calibrate(M(), [torch.randn(8, 4)])
    # counted: last_hidden_state (8x4) and h (8x4); x does not depend on the parameters
    assert st.output_power == pytest.approx(8.0)
    assert st.get("a.weight").gain > 0 and st.get("b.weight").gain > 0


class TwoHeads(nn.Module):
    """The first head reads ``a``, the second ``b``; the first head ignores ``b`` entirely."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.a, self.b = nn.Linear(64, 128), nn.Linear(64, 128)
        self.head1, self.head2 = nn.Linear(128, 4), nn.Linear(128, 4)
        self.scale = scale

    def forward(self, x):
        return {"main": self.head1(torch.tanh(self.a(x))),
                "aux": (self.head2(torch.tanh(self.b(x))) * self.scale,)}


def test_second_head_counts_and_changes_the_tq_file(tmp_path):
    """With only the first head counted (output_fn), layer b has gain 0; with every output
    counted it has a gain like a's, and the tq file gives it more bits."""
    torch.manual_seed(1)
    m = TwoHeads()
    batches = [torch.randn(64, 64) for _ in range(8)]
    first = calibrate(m, batches, output_fn=lambda out: out["main"])
    both = calibrate(m, batches)
    assert first.get("b.weight").gain == 0 and first.get("a.weight").gain > 0
    ga, gb = both.get("a.weight").gain, both.get("b.weight").gain
    assert gb > 0 and 0.1 < gb / ga < 10
    sd = m.state_dict()
    sizes = {}
    for label, st in (("first", first), ("both", both)):
        path = tmp_path / f"{label}.tqz"
        tqcodec.save(sd, path, stats=st, bits=2)
        with tqcodec.open(path) as f:
            sizes[label] = f.info("b.weight").stored_bytes
    assert sizes["both"] > 2 * sizes["first"]


def test_small_head_counts_as_much_as_a_big_one():
    """Each output is scaled by its own magnitude: a head 1000x smaller still counts (the gains'
    ratio is unchanged, where unscaled errors would have cut b's gain a millionfold)."""
    batches = [torch.randn(64, 64) for _ in range(8)]
    ratios = []
    for scale in (1.0, 1e-3):
        torch.manual_seed(2)
        st = calibrate(TwoHeads(scale), batches)
        ratios.append(st.get("b.weight").gain / st.get("a.weight").gain)
    assert ratios[1] == pytest.approx(ratios[0], rel=1e-3)


def test_perturb_method_counts_every_output_too():
    torch.manual_seed(3)
    m = TwoHeads()
    batches = [torch.randn(64, 64) for _ in range(16)]
    a = calibrate(m, batches, sensitivity_batches=16)
    b = calibrate(m, batches, sensitivity_batches=16, sensitivity_method="perturb")
    for n in ("a.weight", "b.weight", "head2.weight", "head2.bias"):
        assert 0.5 < a.get(n).gain / b.get(n).gain < 2, n
    assert a.output_power == pytest.approx(b.output_power)


# --- degenerate inputs --------------------------------------------------------------------------

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_nan_or_inf_in_an_activation_is_refused_naming_the_layer():
    torch.manual_seed(4)
    m = Net()
    x = torch.randn(5, 6)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[2, 3] = bad
        with pytest.raises(TqzError, match=r"batch 1: the input of fc1 \(Linear\) holds NaN or Inf") as e:
            calibrate(m, [x, y])
        assert e.value.code == "BAD_INPUT"
    with torch.no_grad():
        m.fc1.weight[0, 0] = float("inf")  # finite input, infinite activation after fc1
    with pytest.raises(TqzError, match="the input of fc2"):
        calibrate(m, [x])


def test_nan_output_is_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) / 0.0 * 0.0  # NaN
    with pytest.raises(TqzError, match="output holds NaN") as e:
        calibrate(M(), [torch.randn(2, 3)])
    assert e.value.code == "BAD_INPUT"


def test_failing_forward_and_no_batches_are_clear_errors():
    with pytest.raises(TqzError, match=r"batch 0: the module's forward failed: RuntimeError: mat1 and mat2") as e:
        calibrate(Net(), [torch.randn(2, 5)])
    assert e.value.code == "BAD_INPUT" and "\n" not in str(e.value)
    with pytest.raises(TqzError, match="no calibration batches"):
        calibrate(Net(), [])


class SqueezeExcite(nn.Module):
    """A conv whose squeeze-excitation branch reads ReLU(-|x|) = 0: H = 0 there."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.se1, self.se2 = nn.Linear(4, 2), nn.Linear(2, 4)

    def forward(self, x):
        y = self.conv(x)
        s = torch.relu(-y.abs()).mean(dim=(2, 3))  # all zero
        return y * torch.sigmoid(self.se2(torch.relu(self.se1(s))))[:, :, None, None]


def test_all_zero_inputs_dead_channels_and_single_sample():
    torch.manual_seed(5)
    m = SqueezeExcite()
    x = torch.randn(1, 3, 5, 5)
    x[:, 1] = 0  # a dead input channel
    st = calibrate(m, [x], views=False)  # one image, not its shifted views too
    assert np.all(st.get("se1.weight").h == 0) and st.get("se1.weight").rows == 1
    assert np.all(np.isfinite(st.gains()))
    h = st.get("conv.weight").h[0]
    assert np.all(h[9:18] == 0) and np.all(h[:, 9:18] == 0)  # channel 1's 9 kernel taps
    st = calibrate(m, [torch.zeros(2, 3, 5, 5)], views=False)  # all-zero input: H = 0 for conv, and for se1 as before
    assert np.all(st.get("conv.weight").h == 0) and np.all(st.get("se1.weight").h == 0)
    assert st.get("conv.weight").rows == 50 and np.all(np.isfinite(st.gains()))


def test_huge_dynamic_range_stays_finite_and_survives_the_file(tmp_path):
    torch.manual_seed(6)
    m = Net()
    x = torch.randn(16, 6) * torch.tensor([1e12, 1, 1e-12, 1, 1, 0])
    st = calibrate(m, [x])
    h = st.get("fc1.weight").h[0]
    assert np.all(np.isfinite(h)) and h[0, 0] == pytest.approx(float((x[:, 0].double() ** 2).mean()), rel=1e-12)
    assert np.all(np.isfinite(st.gains())) and np.isfinite(st.output_power)
    st.save(str(tmp_path / "s.safetensors"))
    back = tqcodec.Stats.load(str(tmp_path / "s.safetensors")).get("fc1.weight").h[0]
    np.testing.assert_allclose(np.diag(back), np.diag(h), rtol=1e-12)  # 1e24 and 1e-24 both kept


def test_same_inputs_give_the_same_statistics_bytes(tmp_path):
    def run(i):
        torch.manual_seed(7)
        m = nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 2))
        g = torch.Generator().manual_seed(8)
        st = calibrate(m, [torch.randn(4, 3, 8, generator=g) for _ in range(3)])
        st.save(str(tmp_path / f"{i}.safetensors"))
        return (tmp_path / f"{i}.safetensors").read_bytes()
    assert run(0) == run(1)
