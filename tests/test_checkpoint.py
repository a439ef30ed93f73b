"""Atomic writes: all or nothing, with ordinary file permissions."""

from __future__ import annotations

import os
import stat

import pytest

from vqim.checkpoint import atomic_write, read_json, write_json


def test_written_file_has_umask_permissions_not_owner_only(tmp_path):
    old = os.umask(0o027)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640  # as open() makes it, not 0o600
    assert read_json(tmp_path / "a.json") == {"x": 1}
    # Replacing a file keeps its permissions.
    os.chmod(tmp_path / "a.json", 0o604)
    write_json(tmp_path / "a.json", {"x": 2})
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o604 and read_json(tmp_path / "a.json") == {
        "x": 2
    }


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})

    def boom(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "a.json", boom)
    assert read_json(tmp_path / "a.json") == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_load_tensors_accepts_an_indexed_cpu_device(tmp_path):
    import torch

    from vqim.checkpoint import load_tensors, save_tensors

    save_tensors(tmp_path / "w.safetensors", {"a": torch.arange(3.0)})
    out = load_tensors(tmp_path / "w.safetensors", torch.device("cpu", 0))  # Accelerate's CPU device
    assert torch.equal(out["a"], torch.arange(3.0))
