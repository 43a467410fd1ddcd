"""vitlens.profiling.TensorMemory: live tensor bytes, views and in-place ops, frees."""
import pytest
import torch

from vitlens.profiling import TensorMemory


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_tensor_memory_counts_new_storages_once_until_freed(device):
    w = torch.empty(1000, 1000, device=device)  # existed before: not counted
    with TensorMemory() as mem:
        a = w.T @ w  # +4 MB
        b = a.view(-1)  # a view: nothing
        a.add_(1)  # in place: nothing
        c = a + 1  # +4 MB -> 8 MB
        assert mem.current_bytes == 8_000_000
        del a, b  # the storage dies with its last view: -4 MB
        assert mem.current_bytes == 4_000_000
        d = torch.empty(500, 1000, device=device)  # +2 MB -> 6 MB
        x = w.clone().requires_grad_(True)  # +4 MB -> 10 MB
        y = (x * 2).sum()  # x * 2 is not saved for backward: freed at once
        torch.mul(c, 2, out=c)  # out=: nothing
    assert mem.peak_bytes == 14_000_004  # 10 MB + the temporary x * 2 + the 4-byte sum
    assert mem.current_bytes == 10_000_004
    del c, d, x, y
