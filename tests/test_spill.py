"""Tensors parked on disk (inference/loading/spill.py): GPTQ's blocks wait there, not in RAM, until the store is
written; what comes back is what went in, or a clear error."""
import os

import pytest
import torch

from tierstore.errors import CheckpointError
from tierstore.inference.loading.spill import SPILL_BYTES, SpilledTensors


def test_large_tensors_wait_on_disk_and_come_back_as_they_went(tmp_path):
    parked = SpilledTensors(str(tmp_path / "parked"))
    blocks = torch.randint(0, 256, (SPILL_BYTES + 7,), dtype=torch.uint8)
    error = torch.tensor(0.25)
    matrix = torch.randn(300, 64)  # float32, 76,800 bytes: parked too, dtype and shape kept
    parked["a:gptq:Q4_K"], parked["a:gptq-error:Q4_K"], parked["b"] = blocks, error, matrix
    assert len(os.listdir(tmp_path / "parked")) == 2  # the error stays in memory
    assert torch.equal(parked["a:gptq:Q4_K"], blocks) and torch.equal(parked["b"], matrix)
    assert parked["b"].dtype == torch.float32 and parked["b"].shape == (300, 64)
    assert float(parked["a:gptq-error:Q4_K"]) == 0.25
    assert "b" in parked and "c" not in parked and set(parked) == {"a:gptq:Q4_K", "a:gptq-error:Q4_K", "b"}
    received = {}
    received.update(parked)  # what a caller copying every entry sees
    assert torch.equal(received["b"], matrix)
    del parked["b"]
    assert "b" not in parked and len(os.listdir(tmp_path / "parked")) == 1


def test_a_parked_file_changed_or_gone_is_refused_naming_it(tmp_path):
    parked = SpilledTensors(str(tmp_path))
    parked["blocks"] = torch.zeros(SPILL_BYTES, dtype=torch.uint8)
    (path,) = [os.path.join(tmp_path, name) for name in os.listdir(tmp_path)]
    with open(path, "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x01")
    with pytest.raises(CheckpointError, match=f"{path}: the parked tensor 'blocks' changed on disk"):
        parked["blocks"]
    os.unlink(path)
    with pytest.raises(CheckpointError, match="cannot be read back"):
        parked["blocks"]
