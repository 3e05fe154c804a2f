"""tqcodec.distributed: encoding on a Dask cluster gives the bytes of a local encode (needs the
``distributed`` extra)."""
from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import save_file

from tqcodec import api
from tqcodec.io import hf
from tests.helpers import toy_model


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
