"""tqcodec.model.finetune (tqcodec.finetune): training on a file's own grid, output at the same
rate, determinism, option errors, and the per-mode adapters (issue 7, part 3)."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tqcodec
from tqcodec.pipeline.tensors import tensor_to_storage
from tqcodec.errors import TqzError
from tqcodec.model.finetune import ADAPTERS, TqGrid, finetune, nearest_code
from tqcodec.format.writer import ContainerWriter
from tqcodec.format.manifest import TensorRecord
from tqcodec.modes import raw
from tqcodec.modes import tq as tq_mode
from tqcodec.format.steps import steps_from_codes


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


BITS = 3.0  # the input file's bits/param: its loss is several times the float model's
STEPS = 600  # fine-tuning steps (default lr): enough to beat the input at its rate by more than 15%
# (300 steps gave 0.862x of the input's loss on an AMD EPYC host, 0.731x with one round; 600 give 0.744x)


def ce(module: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(module(batch[0]), batch[1])


def mean_loss(module: nn.Module, batches) -> float:
    with torch.no_grad():
        return sum(float(ce(module, b)) for b in batches) / len(batches)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these models are tiny, and on a busy machine a second thread only waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    """A small trained classifier, its training batches, statistics and a tq file at BITS."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=g)
    y = (x @ torch.randn(32, 4, generator=g) + 1.0 * torch.randn(512, 4, generator=g)).argmax(1)
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)]
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for i in range(60):
        loss = ce(net, batches[i % len(batches)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    stats = tqcodec.calibrate(net, [b[0] for b in batches[:4]], sensitivity=False)
    d = tmp_path_factory.mktemp("ft")
    path = d / "in.tqz"
    tqcodec.save(net.state_dict(), path, mode="tq", stats=stats, bits=BITS)
    return {"sd": {k: v.clone() for k, v in net.state_dict().items()}, "batches": batches, "stats": stats,
            "path": path, "dir": d}


def _decoded_net(path) -> Net:
    net = Net()
    net.load_state_dict(tqcodec.load(path))
    net.eval()
    return net


def test_finetune_lowers_loss_same_rate_and_decodes(setup, tmp_path):
    src = setup["path"]
    before = mean_loss(_decoded_net(src), setup["batches"])
    seen = []
    net = _decoded_net(src)
    out = finetune(net, src, setup["batches"], ce, out=tmp_path / "ft.tqz", steps=STEPS, stats=setup["stats"],
                   progress=lambda i, n, loss: seen.append((i, n, loss)))
    assert out == tmp_path / "ft.tqz"
    assert [s[:2] for s in seen] == [(i, STEPS) for i in range(1, STEPS + 1)]
    assert all(math.isfinite(s[2]) for s in seen)
    decoded = tqcodec.load(out)  # the output is a valid file
    tqcodec.verify(out)
    assert all(torch.equal(decoded[k], v) for k, v in net.state_dict().items())  # the module holds it
    after = mean_loss(_decoded_net(out), setup["batches"])
    assert after < 0.85 * before, (before, after)
    size_in, size_out = src.stat().st_size, out.stat().st_size
    assert abs(size_out / size_in - 1) <= 0.03, (size_in, size_out)
    with tqcodec.open(out) as f:
        assert {f.info(k).mode for k in f.keys()} == {"tq", "raw"}  # weights tq, biases exact


def test_finetune_is_deterministic(setup, tmp_path):
    outs = []
    for i in range(2):
        net = _decoded_net(setup["path"])
        rng = torch.get_rng_state()
        finetune(net, setup["path"], setup["batches"], ce, out=tmp_path / f"{i}.tqz", steps=STEPS, seed=3,
                 stats=setup["stats"])
        assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left alone
        outs.append((tmp_path / f"{i}.tqz").read_bytes())
    assert outs[0] == outs[1] and outs[0] != setup["path"].read_bytes()  # the same trained file


class Wider(Net):
    def __init__(self) -> None:
        super().__init__()
        self.fc3 = nn.Linear(64, 5)


class Extra(Net):
    def __init__(self) -> None:
        super().__init__()
        self.fc4 = nn.Linear(4, 4)


@pytest.mark.parametrize("change, words", [
    ({"steps": 0}, "steps"), ({"steps": -3}, "steps"), ({"steps": 2.5}, "steps"), ({"steps": True}, "steps"),
    ({"lr": 0.0}, "lr"), ({"lr": float("nan")}, "lr"), ({"reencode": "best"}, "reencode"),
    ({"path": "missing.tqz"}, "no such"), ({"module": Wider}, "shape"), ({"module": Extra}, "not in the file"),
    ({"batches": []}, "empty"), ({"out": "in"}, "overwrite the input"), ({"rounds": 0}, "rounds"),
    ({"out": "nodir/o.tqz"}, "folder does not exist"),
    ({"loss_fn": lambda m, b: m(b[0])}, "scalar"), ({"loss_fn": lambda m, b: ce(m, b) * float("inf")}, "loss is"),
])
def test_bad_options_raise_bad_option(setup, tmp_path, change, words):
    kw = {"steps": 2, "batches": setup["batches"], "loss_fn": ce, "path": setup["path"], "module": Net,
          "out": tmp_path / "o.tqz"}
    kw.update(change)
    if kw["path"] == "missing.tqz":
        kw["path"] = tmp_path / "missing.tqz"
    if kw["out"] == "in":
        kw["out"] = kw["path"]
    elif kw["out"] == "nodir/o.tqz":
        kw["out"] = tmp_path / "nodir" / "o.tqz"
    module = kw.pop("module")()
    path, batches, loss_fn = kw.pop("path"), kw.pop("batches"), kw.pop("loss_fn")
    with pytest.raises(TqzError, match=words) as exc:
        finetune(module, path, batches, loss_fn, **kw)
    assert exc.value.code == "BAD_OPTION"
    assert not (tmp_path / "o.tqz").exists()


class Tied(nn.Module):
    """Uniform weights, raw biases and a tied weight (stored as alias)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 48)
        self.mid = nn.Linear(48, 48)
        self.mid2 = nn.Linear(48, 48)
        self.mid2.weight = self.mid.weight
        self.fc3 = nn.Linear(48, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        h = torch.relu(self.mid2(torch.relu(self.mid(h))))
        return self.fc3(h)


def test_uniform_file_keeps_its_grid_and_ties(setup, tmp_path):
    torch.manual_seed(1)
    net = Tied()
    src = tmp_path / "u.tqz"
    tqcodec.save(net.state_dict(), src, snr_db=12, granularity="channel")
    with tqcodec.open(src) as f:
        modes_in = {k: f.info(k).mode for k in f.keys()}
        steps_in = {k: f.info(k).params["steps"] for k in f.keys() if f.info(k).mode == "uniform"}
    assert modes_in["mid2.weight"] == "alias" and modes_in["fc1.bias"] == "raw"
    net.load_state_dict(tqcodec.load(src))
    before = mean_loss(net, setup["batches"])
    finetune(net, src, setup["batches"], ce, out=tmp_path / "u-ft.tqz", steps=60)
    assert net.mid2.weight is net.mid.weight
    with tqcodec.open(tmp_path / "u-ft.tqz") as f:
        assert {k: f.info(k).mode for k in f.keys()} == modes_in
        assert {k: f.info(k).params["steps"] for k in steps_in} == steps_in  # the same grid
    assert mean_loss(net, setup["batches"]) < before
    assert abs((tmp_path / "u-ft.tqz").stat().st_size / src.stat().st_size - 1) <= 0.03


def _tq_file(sd: dict, plan: dict) -> bytes:
    """A .tqz with the tensors of ``plan`` (name -> (layout, k, codes)) in mode tq (a float16
    transform of k rows when k is given), the rest raw."""
    buf = io.BytesIO()
    w = ContainerWriter(buf)
    for name, t in sd.items():
        dtype, arr = tensor_to_storage(t)
        if name in plan:
            layout, k, codes = plan[name]
            r = t.double().numpy()
            r = r.T if layout == "in_out" else r.reshape(r.shape[0], -1)
            s = None
            c = r
            if k is not None:
                s = np.linalg.svd(r, full_matrices=False)[2][:k].T.astype(np.float16)
                c = s.astype(np.float64).T @ r.T
            cut = c.shape[0] // len(codes)
            bounds = [0] + [cut * (i + 1) for i in range(len(codes) - 1)] + [c.shape[0]]
            levels = [np.rint(c[a:b] / st).astype(np.int64)
                      for a, b, st in zip(bounds[:-1], bounds[1:], steps_from_codes(codes))]
            _, params, streams = tq_mode.write(levels, codes, layout=layout, transform=s)
            w.add_tensor(TensorRecord(name, dtype, tuple(t.shape), "tq", params), streams)
        else:
            _, params, streams = raw.write(arr, "none")
            w.add_tensor(TensorRecord(name, dtype, tuple(t.shape), "raw", params), streams)
    w.finish({})
    return buf.getvalue()


def test_tq_adapter_starts_at_the_decoded_tensor_and_reencodes_exactly(setup):
    plan = {"fc1.weight": ("out_in", None, [-20, -24]), "fc2.weight": ("in_out", None, [-22, -24, -26]),
            "fc3.weight": ("out_in", 3, [-18])}
    data = _tq_file(setup["sd"], plan)
    decoded = tqcodec.load(data)
    with tqcodec.open(data) as f:
        for name in plan:
            tr = ADAPTERS["tq"](f, name, decoded[name], True)
            assert isinstance(tr, TqGrid)
            got = tr.value().detach()
            if plan[name][1] is None:  # no transform: exact, and stored again exactly
                assert torch.equal(got, decoded[name])
                mode, params, streams = tr.encode(got)
                assert params["steps"] == f.info(name).params["steps"]
                rec = TensorRecord(name, "float32", tuple(got.shape), mode, params)
                assert np.array_equal(tq_mode.decode(tq_mode.parse(rec), rec, streams), got.numpy())
            else:  # float16 transform: the same matrix within float32 rounding of the sum
                assert torch.allclose(got, decoded[name], rtol=1e-5, atol=1e-6)
                loss = (tr.value() ** 2).sum()
                loss.backward()
                assert tr.latent.grad is not None and tr.latent.grad.shape == tr.latent.shape


def test_tq_adapter_keeps_row_bands(setup):
    """A tq tensor whose bands are sets of rows (spec 1.4 row_band): the adapter starts at the
    decoded tensor and stores it again exactly, with the same bands."""
    name = "fc1.weight"
    t = setup["sd"][name]
    r = t.double().numpy()
    band = (np.arange(r.shape[0]) * 7 % 3).astype(np.uint8)
    codes = [-20, -24, -22]
    levels = [np.rint(r[band == b] / st).astype(np.int64) for b, st in enumerate(steps_from_codes(codes))]
    _, params, streams = tq_mode.write(levels, codes, row_band=band)
    assert "row_band" in params
    buf = io.BytesIO()
    w = ContainerWriter(buf)
    w.add_tensor(TensorRecord(name, "float32", tuple(t.shape), "tq", params), streams)
    w.finish({})
    data = buf.getvalue()
    decoded = tqcodec.load(data)
    with tqcodec.open(data) as f:
        tr = ADAPTERS["tq"](f, name, decoded[name], True)
        got = tr.value().detach()
        assert torch.equal(got, decoded[name])
        mode, new, new_streams = tr.encode(got)
        assert new["row_band"] == params["row_band"] and new["steps"] == params["steps"]
        rec = TensorRecord(name, "float32", tuple(got.shape), mode, new)
        assert np.array_equal(tq_mode.decode(tq_mode.parse(rec), rec, new_streams), got.numpy())


def test_nearest_code_is_nearest_on_a_log_scale():
    for code in (-40, -13, 0, 7):
        s = float(steps_from_codes([code])[0])
        assert nearest_code(s) == code
        assert nearest_code(s * 1.05) == code
        nxt = float(steps_from_codes([code + 1])[0])
        assert nearest_code(math.sqrt(s * nxt) * 1.001) == code + 1


# --- codebook and dither modes (spec/mode-lineage.md): files written with the modes' encoders ---

def _lineage_record(name: str, t: torch.Tensor, mode: str) -> tuple[TensorRecord, list]:
    """``t`` coded in ``mode`` by plain nearest rounding (the lineage encoders' numerics are not
    under test here, only the bitstream the adapters read and write)."""
    from tqcodec.modes import dither, ecsq, kmeans, pq
    from tqcodec.modes.dither.format import dither_offsets
    w = t.detach().double().numpy()
    n = w.shape[0]
    r = w.reshape(n, -1)

    def book_of(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        book = np.unique(np.quantile(x, np.linspace(0.02, 0.98, k)).astype(np.float16).astype(np.float64))
        sym = np.abs(x.reshape(-1, 1) - book[None]).argmin(1)
        used = np.unique(sym)
        return book[used], np.searchsorted(used, sym)

    if mode == "kmeans":
        groups, books = [], []
        for part in (r[:n // 2], r[n // 2:]):
            b, s = book_of(part, 8)
            groups.append(s.reshape(part.shape))
            books.append(b)
        _, params, streams = kmeans.write(groups, books)
    elif mode == "pq":
        sub = r.reshape(n, -1, 2).reshape(-1, 2)
        book = np.unique(sub[:: max(1, len(sub) // 16)].astype(np.float16).astype(np.float64), axis=0)
        sym = ((sub[:, None, :] - book[None]) ** 2).sum(-1).argmin(1)
        used = np.unique(sym)
        _, params, streams = pq.write(np.searchsorted(used, sym).reshape(n, -1), book[used])
    elif mode == "ecsq":
        b, s = book_of(w.reshape(-1), 8)
        _, params, streams = ecsq.write(s, recon="codebook", values=b)
    elif mode == "ecsq_grid":
        lv = np.rint(w.reshape(-1) / steps_from_codes([-20])[0]).astype(np.int64)
        _, params, streams = ecsq.write(lv - lv.min(), recon="grid", step=-20, q_min=int(lv.min()))
        mode = "ecsq"
    else:  # dither, scalar lattice
        u = dither_offsets("scalar", -18, 7, w.size)
        lv = np.rint((w.reshape(-1) + u) / steps_from_codes([-18])[0]).astype(np.int64)
        _, params, streams = dither.write([lv], step=-18, seed=7)
    return TensorRecord(name, "float32", tuple(t.shape), mode, params), streams


LINEAGE = {"fc1.weight": "kmeans", "fc2.weight": "pq", "fc3.weight": "dither", "fc1.bias": "ecsq_grid",
           "fc2.bias": "ecsq"}


def test_codebook_and_dither_adapters(setup, tmp_path):
    buf = io.BytesIO()
    w = ContainerWriter(buf)
    for name, t in setup["sd"].items():
        if name in LINEAGE:
            w.add_tensor(*_lineage_record(name, t, LINEAGE[name]))
        else:
            w.add_tensor(TensorRecord(name, "float32", tuple(t.shape), "raw", raw.write(t.numpy(), "none").params),
                         raw.write(t.numpy(), "none").streams)
    w.finish({})
    src = tmp_path / "lineage.tqz"
    src.write_bytes(buf.getvalue())
    decoded = tqcodec.load(src)
    with tqcodec.open(src) as f:
        modes_in = {k: f.info(k).mode for k in f.keys()}
        for name in LINEAGE:  # each adapter starts at the decoded tensor and stores it again as decoded
            tr = ADAPTERS[modes_in[name]](f, name, decoded[name], True)
            got = tr.value().detach()
            assert torch.allclose(got, decoded[name], rtol=0, atol=1e-6), name
            mode, params, streams = tr.encode(got)
            rec = TensorRecord(name, "float32", tuple(got.shape), mode, params)
            from tqcodec import modes
            assert mode == modes_in[name] and np.allclose(modes.decode(rec, streams), decoded[name].numpy(),
                                                          rtol=0, atol=1e-6), name
    net = _decoded_net(src)
    before = mean_loss(net, setup["batches"])
    out = finetune(net, src, setup["batches"], ce, out=tmp_path / "lineage-ft.tqz", steps=60, lr=0.03)
    with tqcodec.open(out) as f:
        assert {k: f.info(k).mode for k in f.keys()} == modes_in
    assert mean_loss(net, setup["batches"]) < before
    assert abs(out.stat().st_size / src.stat().st_size - 1) <= 0.03


def test_existing_output_refused_before_training(setup, tmp_path):
    (tmp_path / "o.tqz").write_bytes(b"keep")
    calls = []
    with pytest.raises(TqzError) as exc:
        finetune(Net(), setup["path"], setup["batches"], ce, out=tmp_path / "o.tqz", steps=2, overwrite=False,
                 progress=lambda *a: calls.append(a))
    assert exc.value.code == "OUTPUT_EXISTS" and not calls and (tmp_path / "o.tqz").read_bytes() == b"keep"
