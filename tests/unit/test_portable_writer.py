"""The portable copy's shard writer streams tensors into a file safetensors reads back exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from megatrain.export.portable_format import PortableCheckpoint, ShardWriter


def test_a_streamed_shard_reads_back_exactly(tmp_path):
    values = {"w": torch.randn(3, 5), "exp_avg/w": torch.randn(3, 5), "b": torch.randn(7), "empty": torch.zeros(0, 4)}
    with ShardWriter(tmp_path, 1, 0, 2, {k: list(v.shape) for k, v in values.items()},
                     {"w": 0, "b": None, "empty": None}) as writer:
        for key, value in values.items():
            writer.write(key, value)
    with safe_open(str(tmp_path / "pp001-tp000.safetensors"), framework="pt") as f:
        assert f.metadata() == {"tp_dims": '{"w": 0, "b": null, "empty": null}', "tp": "2", "tp_rank": "0"}
        assert sorted(f.keys()) == sorted(values)
        for key, value in values.items():
            assert torch.equal(f.get_tensor(key), value)
        assert torch.equal(f.get_slice("w")[:, 1:3], values["w"][:, 1:3])


def test_the_writer_refuses_a_tensor_out_of_order_or_of_another_shape(tmp_path):
    shapes = {"a": [2], "b": [3]}
    with pytest.raises(ValueError, match="expected a float32 \\[2\\], got b"):
        with ShardWriter(tmp_path, 0, 0, 1, shapes, {"a": None, "b": None}) as writer:
            writer.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="expected a float32 \\[2\\], got a torch.float32 \\[3\\]"):
        with ShardWriter(tmp_path, 0, 0, 1, shapes, {"a": None, "b": None}) as writer:
            writer.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match="1 tensors never written, first b"):
        with ShardWriter(tmp_path, 0, 0, 1, shapes, {"a": None, "b": None}) as writer:
            writer.write("a", torch.zeros(2))


def test_portable_checkpoint_reads_a_streamed_shard(tmp_path):
    (tmp_path / "state.json").write_text('{"model": {}, "tp": 1}')
    with ShardWriter(tmp_path, 0, 0, 1, {"w": [4, 2]}, {"w": 1}) as writer:
        writer.write("w", torch.arange(8.0).reshape(4, 2))
    source = PortableCheckpoint(tmp_path)
    assert source.shape("w") == [4, 2]
    assert torch.equal(source.local("w", None, 1, 2, 1), torch.arange(8.0).reshape(4, 2)[:, 1:])
