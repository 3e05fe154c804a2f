"""tqcodec.io.hf: Hugging Face folders in and out (issue 9): lazy tensors, shards, carried files
(their names untrusted), atomic output folders, a folder transformers loads."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import tqcodec
from tqcodec import api, parallel
from tqcodec.io import hf
from tqcodec.errors import TqzError
from tqcodec.format.writer import ContainerWriter
from tqcodec.format.manifest import TensorRecord
from tqcodec.modes import raw
from tests.helpers import toy_model


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


def test_options_checked():
    with pytest.raises(TqzError):
        parallel.check_jobs(-1)
    with pytest.raises(TqzError):
        hf.parse_size("lots")
    assert hf.parse_size("5GB") == 5 * 10**9 and hf.parse_size("2GiB") == 2 << 30 and hf.parse_size("100") == 100
