"""What calibrating a large model costs: second moments of wide inputs in float32 (within its
precision, never overflowing), the probes' gradients held a few at a time, not all at once, and
probes on fewer batches of a large model."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

import tqcodec.model.calibrate as cal


def _gram(x: torch.Tensor) -> np.ndarray:
    a = x.detach().reshape(-1, x.shape[-1]).double()
    return (a.T @ a / len(a)).numpy()


def test_wide_inputs_are_multiplied_in_float32_within_its_precision():
    """A layer of d >= FLOAT32_PRODUCT_DIM inputs gets H within float32's precision of the exact
    one (relative to the diagonal), a narrower one the exact float64 products."""
    torch.manual_seed(0)
    d = cal.FLOAT32_PRODUCT_DIM
    wide, narrow = nn.Linear(d, 3), nn.Linear(d - 1, 3)
    xw, xn = torch.randn(200, d) * 3.0 + 1.0, torch.randn(200, d - 1)
    hw = cal.calibrate(wide, [xw], sensitivity=False).get("weight").h[0]
    hn = cal.calibrate(narrow, [xn], sensitivity=False).get("weight").h[0]
    exact = _gram(xw)
    scale = np.sqrt(np.outer(np.diag(exact), np.diag(exact)))
    off = np.abs(hw - exact) / scale
    assert off.max() < 1e-5
    assert off.max() > 0  # float32 products: not the float64 bits
    np.testing.assert_allclose(hn, _gram(xn), rtol=1e-12, atol=0)


def test_huge_wide_inputs_fall_back_to_float64_products():
    """Inputs whose squares would overflow float32 (|x| ~ 1e19) are multiplied in float64: a
    finite H, equal to the exact one, not an overflow refused as Inf."""
    torch.manual_seed(0)
    d = cal.FLOAT32_PRODUCT_DIM
    x = torch.randn(64, d) * 1e19
    h = cal.calibrate(nn.Linear(d, 2), [x], sensitivity=False).get("weight").h[0]
    assert np.isfinite(h).all()
    np.testing.assert_allclose(h, _gram(x), rtol=1e-12)


class _Deep(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.head = nn.Linear(8, 5)

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def test_probe_gradients_are_taken_one_parameter_at_a_time(monkeypatch):
    """Each parameter's probe gradient is summed and dropped as soon as the backward pass has it,
    so few are held at once (the whole model's would be a second copy of its weights); gradients
    the parameters held before calibrating are theirs again after."""
    torch.manual_seed(0)
    model = _Deep()
    params = list(model.parameters())
    before = [torch.full_like(p, 0.5) for p in params]
    for p, g in zip(params, before):
        p.grad = g
    held: list[int] = []
    take = cal._Probe._take

    def counting(self, j, p):
        held.append(sum(q.grad is not None for q in params))
        take(self, j, p)
    monkeypatch.setattr(cal._Probe, "_take", counting)
    ids = torch.randint(0, 50, (6, 7))
    stats = cal.calibrate(model, [ids, ids.flip(0)])
    assert len(held) == 2 * len(params)  # every parameter, every probe batch
    assert max(held) <= 2
    assert all(p.grad is g for p, g in zip(params, before))
    assert all(stats.get(n).gain > 0 for n, _ in model.named_parameters())


def test_the_probes_of_a_large_model_run_on_fewer_batches(monkeypatch):
    """``tqz calibrate`` probes the first PROBE_BATCHES batches unless their tokens times the
    model's parameters pass PROBE_WORK: then as many as stay within it, at least one."""
    model = nn.Linear(10, 10)  # 110 parameters
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0  # 8 tokens a batch: 880 tokens x parameters
    batches = [{"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": mask} for _ in range(10)]
    monkeypatch.setattr(cal, "PROBE_WORK", 100_000)
    assert cal.probe_batches(batches, model) == cal.PROBE_BATCHES
    assert cal.probe_batches(batches[:3], model) == cal.PROBE_BATCHES  # (calibrate's views fill the rest)
    monkeypatch.setattr(cal, "PROBE_WORK", 3 * 880)
    assert cal.probe_batches(batches, model) == 3
    monkeypatch.setattr(cal, "PROBE_WORK", 10)
    assert cal.probe_batches(batches, model) == 1



def test_symmetrize_is_the_average_with_the_transpose_in_place(monkeypatch):
    """Block by block (blocks that do not divide d included), the same bits as (h + h.T) / 2,
    written into h itself."""
    monkeypatch.setattr(cal, "SYMMETRIZE_BLOCK", 8)
    h = np.random.default_rng(0).standard_normal((37, 37))
    expected = (h + h.T) / 2
    before = h.__array_interface__["data"][0]
    cal.symmetrize(h)
    np.testing.assert_array_equal(h, expected)
    assert h.__array_interface__["data"][0] == before


class _SharedThenDeep(nn.Module):
    """Query, key and value of one input, then a chain of layers of inputs of their own."""

    def __init__(self, depth: int = 10):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.chain = nn.ModuleList(nn.Linear(6, 6) for _ in range(depth))

    def forward(self, x):
        y = self.q(x) + self.k(x) * self.v(x)
        for layer in self.chain:
            y = torch.tanh(layer(y))
        return y


def test_a_batch_keeps_only_the_latest_products(monkeypatch):
    """Layers that read one input (query, key, value) still share one product, but a batch keeps
    at most PRODUCTS_KEPT of them, not one per layer until the next batch (another copy of every
    H); the statistics are the exact ones."""
    sizes, products = [], []
    add, bmm = cal._Acc.add, torch.bmm

    def spy_add(self, rows, group=None, cache=None, source=None):
        add(self, rows, group, cache, source)
        if cache is not None:
            sizes.append(len(cache))

    def spy_bmm(a, b):
        products.append(1)
        return bmm(a, b)

    monkeypatch.setattr(cal._Acc, "add", spy_add)
    monkeypatch.setattr(torch, "bmm", spy_bmm)
    torch.manual_seed(3)
    model, x = _SharedThenDeep(), torch.randn(4, 5, 6)
    st = cal.calibrate(model, [x, x * 0.5], sensitivity=False)
    assert max(sizes) == cal.PRODUCTS_KEPT
    assert len(products) == 2 * (1 + len(model.chain))  # q, k and v: one product a batch
    xd = torch.cat([x, x * 0.5]).reshape(-1, 6).double().numpy()
    for n in ("q.weight", "k.weight", "v.weight"):
        np.testing.assert_allclose(st.get(n).h[0], xd.T @ xd / len(xd), rtol=1e-12)


def test_statistics_are_made_in_the_accumulators_memory(monkeypatch):
    """Each H is the accumulator's own array, divided and symmetrized where it is (a copy beside
    every accumulator doubled calibration's peak memory); the accumulator is spent."""
    pairs = []
    result = cal._Acc.result

    def spy(self):
        sums = self.sums.h if self.sums.made is None else self.sums.made[0]  # shared: made once
        st = result(self)
        pairs.append((st.h is sums, self.sums, st.h))
        return st

    monkeypatch.setattr(cal._Acc, "result", spy)
    torch.manual_seed(4)
    cal.calibrate(_SharedThenDeep(depth=2), [torch.randn(3, 4, 6)], sensitivity=False)
    assert len(pairs) == 5  # q, k, v and the two of the chain
    for same, left, h in pairs:
        assert same and left is None
        np.testing.assert_array_equal(h[0], h[0].T)


class _SometimesShared(nn.Module):
    """Gate and up read one input; ``side`` reads it too, but on odd batches a scaled copy."""

    def __init__(self):
        super().__init__()
        self.gate, self.up, self.side = nn.Linear(6, 5), nn.Linear(6, 5), nn.Linear(6, 5)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        other = x if self.calls % 2 else x * 3.0
        return self.gate(x) * self.up(x) + self.side(other)


def test_layers_of_one_input_share_their_sums_until_their_inputs_differ():
    """Layers that read one input keep one array of sums while they take the same products (one
    copy of H, not one a layer); a layer whose input differs in a later batch gets a copy of the
    sums so far and goes on alone. Every H is the exact one of its own inputs."""
    torch.manual_seed(5)
    model = _SometimesShared()
    xs = [torch.randn(3, 4, 6) for _ in range(3)]
    col = cal._Collector(model, 1 << 16)
    with torch.no_grad():
        col.batch.start(0, None, False)
        model(xs[0])
        col.batch.flush()
        accs = [col.accs[f"{n}.weight"] for n in ("gate", "up", "side")]
        assert accs[0].sums is accs[1].sums is accs[2].sums and accs[0].sums.members == 3
        for i, x in enumerate(xs[1:], 1):
            col.batch.start(i, None, False)
            model(x)
        col.batch.flush()
    assert accs[0].sums is accs[1].sums and accs[0].sums.members == 2
    assert accs[2].sums is not accs[0].sums and accs[2].sums.members == 1
    st = col.stats()
    col.remove()
    assert st["gate.weight"].h is st["up.weight"].h
    mine = torch.cat([x.reshape(-1, 6) for x in xs]).double().numpy()
    side = torch.cat([x.reshape(-1, 6) * (1.0 if i % 2 == 0 else 3.0) for i, x in enumerate(xs)]).double().numpy()
    np.testing.assert_allclose(st["gate.weight"].h[0], mine.T @ mine / len(mine), rtol=1e-12)
    np.testing.assert_allclose(st["side.weight"].h[0], side.T @ side / len(side), rtol=1e-12)


def _collected(model: nn.Module, xs: list) -> tuple:
    """(the collector after ``xs``, one batch each, with every product added, and its stats)."""
    col = cal._Collector(model, 1 << 16)
    with torch.no_grad():
        for i, x in enumerate(xs):
            col.batch.start(i, None, False)
            model(x)
        col.batch.flush()
    dtypes = {n: a.sums.h.dtype for n, a in col.accs.items()}
    st = col.stats()
    col.remove()
    return dtypes, st


def test_wide_inputs_are_summed_and_kept_in_float32(monkeypatch):
    """Inputs of FLOAT32_PRODUCT_DIM or more dimensions keep float32 sums through the batches and a
    float32 H after them (half the memory calibration holds), symmetric and within float32's
    rounding of the exact one; narrower inputs stay float64; an input whose squares float32
    cannot sum turns its sums float64."""
    monkeypatch.setattr(cal, "FLOAT32_PRODUCT_DIM", 8)
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 3))
    xs = [torch.randn(5, 12) for _ in range(4)]
    dtypes, st = _collected(model, xs)
    assert dtypes == {"0.weight": np.float32, "2.weight": np.float64}
    rows = torch.cat(xs).double().numpy()
    h = st["0.weight"].h
    assert h.dtype == np.float32 and st["2.weight"].h.dtype == np.float64
    np.testing.assert_array_equal(h[0], h[0].T)
    exact = rows.T @ rows / len(rows)
    np.testing.assert_allclose(h[0], exact, rtol=1e-6, atol=1e-6 * np.abs(exact).max())
    dtypes, st = _collected(model, xs + [torch.full((1, 12), 1e16)])
    assert dtypes["0.weight"] == np.float64 and np.isfinite(st["0.weight"].h).all()


def test_each_batch_hands_its_freed_memory_back(monkeypatch):
    """After each batch (views included) calibrate returns the memory the batch freed to the OS
    (glibc's arenas kept it: 2.2 GiB through a 604M-parameter Llama's batches)."""
    trims = []
    monkeypatch.setattr(cal, "trim_malloc", lambda: trims.append(1) or True)
    torch.manual_seed(7)
    cal.calibrate(_SharedThenDeep(depth=2), [torch.randn(3, 4, 6) for _ in range(3)], sensitivity=False)
    assert len(trims) == 3
