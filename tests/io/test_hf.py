"""Issue 9: Hugging Face folders, streaming (lazy) encode, process pools, a Dask cluster."""
from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import tqcodec
from tqcodec import api, parallel
from tqcodec.pipeline.encode import tq_blocks
from tqcodec.io import hf
from tqcodec.cli import app
from tqcodec.errors import TqzError
from tqcodec.format.writer import ContainerWriter
from tqcodec.format.manifest import TensorRecord
from tqcodec.modes import raw

from tests.helpers import small_state_dict

runner = CliRunner()
FILES = {"config.json": b'{"model_type": "toy", "hidden_size": 48}\n',
         "tokenizer.json": json.dumps({"vocab": {"a": 0, "\u00e9": 1}}).encode(),
         "generation_config.json": b"{}", "vocab.txt": b"[PAD]\n[UNK]\nhello\n",
         "tokenizer.model": bytes(range(256))}


def toy_model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(3):
        sd[f"layers.{i}.attn.weight"] = (torch.randn(48, 48, generator=g) * 0.05).to(torch.bfloat16)
        sd[f"layers.{i}.mlp.weight"] = (torch.randn(96, 48, generator=g) * 0.05).to(torch.bfloat16)
        sd[f"layers.{i}.norm.weight"] = torch.ones(48, dtype=torch.bfloat16)
    sd["embed.weight"] = torch.randn(100, 48, generator=g).to(torch.bfloat16)
    sd["pos_ids"] = torch.arange(64, dtype=torch.int64)
    sd["head.bias"] = torch.randn(100, generator=g)  # float32 among bf16: alignment in shards
    return sd


def write_hf(folder: Path, sd: dict[str, torch.Tensor], shards: int) -> None:
    folder.mkdir(parents=True)
    names = list(sd)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        save_file({k: sd[k] for k in group}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in group})
    if shards > 1:
        (folder / hf.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name, data in FILES.items():
        (folder / name).write_bytes(data)
    (folder / "big.bin").write_bytes(b"\0" * 10)  # a weight-like file: never carried
    (folder / ".hidden.json").write_bytes(b"{}")


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(p)))
    return out


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "toy"
    write_hf(folder, toy_model(), shards=3)
    return folder


def test_folder_round_trip_lossless_sharded(hf_src, tmp_path):
    out = tmp_path / "toy.tqz"
    res = runner.invoke(app, ["encode", str(hf_src), "-o", str(out), "--lossless", "-j", "2"])
    assert res.exit_code == 0, res.output
    with tqcodec.open(out) as f:
        assert set(f.metadata["tqz.files"]) == set(FILES)  # not big.bin, not .hidden.json
    dec = tmp_path / "dec"
    res = runner.invoke(app, ["decode", str(out), "-o", str(dec), "--shard-size", "20KB"])
    assert res.exit_code == 0, res.output
    shards = sorted(p.name for p in dec.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((dec / hf.INDEX_NAME).read_text())
    src = toy_model()
    got = load_folder(dec)
    assert set(index["weight_map"]) == set(src) == set(got)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in src.values())
    for p in dec.glob("*.safetensors"):  # shards within the size (no tensor here is bigger)
        assert p.stat().st_size < 20_000 + 4096
    for k, t in src.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    for name, data in FILES.items():
        assert (dec / name).read_bytes() == data
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_folder_single_shard_and_lazy_streaming(hf_src, tmp_path):
    tensors, files = hf.read_folder(hf_src)
    assert isinstance(tensors, hf.LazyTensors) and tensors.numel() == sum(t.numel() for t in toy_model().values())
    out = tmp_path / "m.tqz"
    api.save(tensors, out, files=files)
    names = api.decode_folder(out, tmp_path / "one")  # default 5GB: one model.safetensors, no index
    assert names == ["model.safetensors"] and not (tmp_path / "one" / hf.INDEX_NAME).exists()
    got = load_file(str(tmp_path / "one" / "model.safetensors"))
    ref = api.load(out)
    assert list(ref) == [k for k, _ in tensors.refs()]
    for k in ref:
        assert torch.equal(got[k], ref[k])


def test_transformers_loads_decoded_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    model.save_pretrained(tmp_path / "bert", max_shard_size="50KB")
    assert (tmp_path / "bert" / hf.INDEX_NAME).exists()
    tensors, files = hf.read_folder(tmp_path / "bert")
    api.save(tensors, tmp_path / "bert.tqz", files=files, snr_db=50)
    api.decode_folder(tmp_path / "bert.tqz", tmp_path / "back", shard_size=40_000)
    back = transformers.BertModel.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, 120, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = model(ids).last_hidden_state
        b = back(ids).last_hidden_state
    assert float((a - b).norm() / a.norm()) < 0.05


@pytest.mark.parametrize("bad", ["../evil", "a/b", "/abs", "..", ".", "x\n", ".bashrc", "c:\\x", "",
                                 "model.safetensors", hf.INDEX_NAME, "w.bin"])
def test_untrusted_file_names_rejected(tmp_path, bad):
    buf = tmp_path / "bad.tqz"
    with open(buf, "wb") as f:
        w = ContainerWriter(f)
        _, params, streams = raw.write(torch.ones(3).numpy(), "none")
        w.add_tensor(TensorRecord("w", "float32", (3,), "raw", params), streams)
        w.finish({"tqz.files": {bad: b"pwned"}})
    with pytest.raises(TqzError) as e:
        api.decode_folder(buf, tmp_path / "out")
    assert e.value.code == "BAD_INPUT"  # spec §5.2.1: the file is valid, the folder cannot be made
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.tqz"]


def test_non_binary_file_value_rejected(tmp_path):
    buf = tmp_path / "bad.tqz"
    with open(buf, "wb") as f:
        w = ContainerWriter(f)
        w.finish({"tqz.files": {"config.json": "text, not bytes"}})
    with pytest.raises(TqzError, match="not binary"):
        api.decode_folder(buf, tmp_path / "out")


def test_folder_output_atomic(hf_src, tmp_path):
    out = tmp_path / "m.tqz"
    api.encode_folder(hf_src, out, lossless=True)
    dec = tmp_path / "dec"
    dec.mkdir()
    (dec / "keep.txt").write_text("old")
    with pytest.raises(TqzError) as e:
        api.decode_folder(out, dec)
    assert e.value.code == "OUTPUT_EXISTS" and (dec / "keep.txt").read_text() == "old"
    # a damaged payload fails midway: the previous folder stays, no temporary folder is left
    data = bytearray(out.read_bytes())
    with tqcodec.open(out) as f:
        last = f.info(f.keys()[-1])
        off, n = last.offset, last.stored_bytes
    data[off + n - 1] ^= 0xFF
    bad = tmp_path / "bad.tqz"
    bad.write_bytes(bytes(data))
    with pytest.raises(TqzError) as e:
        api.decode_folder(bad, dec, overwrite=True)
    assert e.value.code == "CHECKSUM_MISMATCH"
    assert sorted(p.name for p in dec.iterdir()) == ["keep.txt"]
    api.decode_folder(out, dec, overwrite=True)
    assert not (dec / "keep.txt").exists() and (dec / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tqz", "dec", "m.tqz"]


def test_jobs_give_identical_bytes_and_tensors(hf_src, tmp_path):
    sd = small_state_dict()
    sd["tied"] = sd["fc.weight"]  # an alias, decided the same way on every path
    sd["big"] = torch.randn(300, 200, generator=torch.Generator().manual_seed(3))
    base = api.encode_bytes(sd)
    assert api.encode_bytes(sd, jobs=2) == base
    tensors, files = hf.read_folder(hf_src)
    one, two = tmp_path / "1.tqz", tmp_path / "2.tqz"
    api.save(tensors, one, files=files, jobs=1)
    api.save(tensors, two, files=files, jobs=2)
    assert one.read_bytes() == two.read_bytes()
    # the lazy folder gives the same bytes as the same tensors in memory
    assert one.read_bytes() == api.encode_bytes({k: v.load() for k, v in tensors.refs()}, files=files)
    a, b = api.load(base), api.load(_write(tmp_path / "s.tqz", base), jobs=2)
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert b["tied"] is b["fc.weight"]
    c = api.decode_folder(one, tmp_path / "d2", jobs=2, shard_size=30_000)
    d = api.decode_folder(one, tmp_path / "d1", jobs=1, shard_size=30_000)
    assert c == d and all((tmp_path / "d2" / n).read_bytes() == (tmp_path / "d1" / n).read_bytes() for n in c)


def test_tq_tensor_scope_streams_with_identical_bytes(hf_src, tmp_path):
    tensors, _ = hf.read_folder(hf_src)
    a = api.encode_bytes(tensors, mode="tq", bits=4, tq_scope="tensor")
    b = api.encode_bytes(tensors, mode="tq", bits=4, tq_scope="tensor", jobs=2)
    assert a == b
    with tqcodec.open(a) as f:
        assert "tq" in {f.info(n).mode for n in f.keys()}


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


class _CountingRef(hf.TensorRef):
    live = 0
    peak = 0

    def load(self, rows=None):
        t = super().load(rows)
        _CountingRef.live += 1
        _CountingRef.peak = max(_CountingRef.peak, _CountingRef.live)
        weakref.finalize(t, lambda: setattr(_CountingRef, "live", _CountingRef.live - 1))
        return t


def test_lazy_encode_holds_one_tensor_at_a_time(hf_src):
    tensors, _ = hf.read_folder(hf_src)
    counting = hf.LazyTensors((k, _CountingRef(r.path, r.key)) for k, r in tensors.refs())
    data = api.encode_bytes(counting)
    assert _CountingRef.peak == 1 and _CountingRef.live == 0
    assert data == api.encode_bytes(tensors)


def test_options_checked():
    with pytest.raises(TqzError):
        parallel.check_jobs(-1)
    with pytest.raises(TqzError):
        hf.parse_size("lots")
    assert hf.parse_size("5GB") == 5 * 10**9 and hf.parse_size("2GiB") == 2 << 30 and hf.parse_size("100") == 100


def test_dask_local_cluster_same_bytes(hf_src, tmp_path):
    distributed = pytest.importorskip("distributed")
    from tqcodec import distributed as tqd
    sd = toy_model(1)
    (tmp_path / "models").mkdir()
    save_file(sd, str(tmp_path / "models" / "a.safetensors"))
    import shutil
    shutil.copytree(hf_src, tmp_path / "models" / "toy")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl, \
            distributed.Client(cl) as client:
        sizes = tqd.encode_directory(tmp_path / "models", tmp_path / "out", client)
        tensors, files = hf.read_folder(hf_src)
        n = tqd.save(tensors, tmp_path / "big.tqz", client, files=files)
    assert sorted(Path(p).name for p in sizes) == ["a.tqz", "toy.tqz"]
    from tqcodec.io.files import read_model
    assert (tmp_path / "out" / "a.tqz").read_bytes() == api.encode_bytes(read_model(tmp_path / "models" / "a.safetensors"))
    local = tmp_path / "local.tqz"
    api.encode_folder(hf_src, local)
    assert (tmp_path / "out" / "toy.tqz").read_bytes() == local.read_bytes()
    assert (tmp_path / "big.tqz").read_bytes() == local.read_bytes() and n == local.stat().st_size


def test_tq_row_blocks_of_large_tensors(tmp_path, monkeypatch):
    """Large tensors under tq_scope 'tensor' go in row blocks (parallel tasks) joined into one
    record: same bytes for every jobs, from memory or from a lazy folder, and they decode."""
    import tqcodec.pipeline.encode
    monkeypatch.setattr(tqcodec.pipeline.encode, "TQ_BLOCK_PARAMS", 2000)  # row blocks when encoding
    monkeypatch.setattr(parallel, "TQ_BLOCK_PARAMS", 2000)  # row pieces when decoding to a folder
    g = torch.Generator().manual_seed(5)
    sd = {"w": (torch.randn(90, 64, generator=g) * torch.rand(90, 1, generator=g)).to(torch.bfloat16),
          "v": torch.randn(8, 3, 5, 7, generator=g), "b": torch.randn(90, generator=g)}
    a = api.encode_bytes(sd, mode="tq", bits=4, tq_scope="tensor")
    with tqcodec.open(a) as f:
        assert f.info("w").mode == "tq" and len(f.info("w").params["band_rows"]) >= 3
    assert api.encode_bytes(sd, mode="tq", bits=4, tq_scope="tensor", jobs=2) == a
    folder = tmp_path / "m"
    folder.mkdir()
    save_file(sd, str(folder / "model.safetensors"))
    tensors, _ = hf.read_folder(folder)
    lazy = {k: v.load() for k, v in tensors.refs()}
    assert api.encode_bytes(tensors, mode="tq", bits=4, tq_scope="tensor", jobs=2) == \
        api.encode_bytes(lazy, mode="tq", bits=4, tq_scope="tensor")
    back = api.load(a)
    opts = api.EncodeOptions(mode="tq", bits=4, tq_scope="tensor")
    blocks = [api.load(api.encode_bytes({"w": sd["w"][r0:r1]}, mode="tq", bits=4, tq_scope="tensor"))["w"]
              for r0, r1 in tq_blocks(sd["w"], opts)]
    assert torch.equal(back["w"], torch.cat(blocks))  # the joined record decodes to its blocks
    err = float((back["w"].float() - sd["w"].float()).norm() / sd["w"].float().norm())
    assert err < 0.35  # 4 bits on blocks this tiny: the per-band tables cost much
    # decoding to a folder: the large tq tensor in row pieces, the same values as a whole decode
    tqz = _write(tmp_path / "a.tqz", a)
    with tqcodec.open(tqz) as f:
        ti = f.info("w")
        assert len(parallel.tq_pieces(TensorRecord(ti.name, ti.dtype, ti.shape, ti.mode, ti.params))) >= 2
    for jobs in (1, 2):
        api.decode_folder(tqz, tmp_path / f"d{jobs}", jobs=jobs)
        got = load_file(str(tmp_path / f"d{jobs}" / "model.safetensors"))
        assert all(torch.equal(got[k], back[k]) for k in back)


def test_worker_errors_arrive_as_tqz_errors(tmp_path):
    sd = {"ok": torch.randn(40, 40), "bad": torch.randn(4, dtype=torch.complex64)}
    with pytest.raises(TqzError) as e:
        api.save(sd, tmp_path / "x.tqz", jobs=2)
    assert e.value.code == "BAD_INPUT" and "complex" in e.value.message
    assert list(tmp_path.iterdir()) == []  # no partial output


def test_cli_tq_scope_tensor_jobs(hf_src, tmp_path):
    a, b = tmp_path / "a.tqz", tmp_path / "b.tqz"
    for out, j in ((a, "1"), (b, "2")):
        res = runner.invoke(app, ["encode", str(hf_src), "-o", str(out), "--mode", "tq", "--bits", "4",
                                  "--tq-scope", "tensor", "-j", j])
        assert res.exit_code == 0, res.output
    assert a.read_bytes() == b.read_bytes()
    res = runner.invoke(app, ["encode", str(hf_src), "-o", str(a), "--tq-scope", "layer", "-f"])
    assert res.exit_code == 1 and "BAD_OPTION" in res.output


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
