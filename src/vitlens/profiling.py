"""Device-independent cost accounting: peak tensor memory and FLOPs of a piece of code.

``TensorMemory`` counts the bytes of every tensor storage created inside it and still alive,
and keeps the peak. Run on the ``meta`` device (no data, no compute) it predicts what
``torch.cuda.max_memory_allocated()`` reports for the same code on a GPU, above the memory
allocated before, without a GPU: the CUDA caching allocator adds only block rounding (512 B;
2 MiB segments for large blocks) and library workspaces (cuBLAS, cuDNN), which it cannot see.
On any device it also shows whether code makes a data-dependent host-device synchronisation:
meta tensors have no values, so ``.item()``, ``.tolist()``, ``nonzero()`` or a boolean mask
raise there.

    with TensorMemory() as mem:
        explain(model.to("meta"), torch.empty(64, 3, 224, 224, device="meta"))
    print(mem.peak_bytes / 2**30, "GiB")
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemory(TorchDispatchMode):
    """Peak and current bytes of the tensor storages created inside the ``with`` block.

    Storages that existed before (weights, inputs) are not counted, as with
    ``max_memory_allocated() - memory_allocated()`` measured around the block. A storage is
    counted once however many views share it, and leaves the count when it is freed.
    """

    def __init__(self):
        super().__init__()
        self.current_bytes = 0
        self.peak_bytes = 0
        self._seen: dict[int, weakref.ref] = {}  # id(storage) -> weak reference to it

    def _freed(self, key: int, nbytes: int) -> None:
        self._seen.pop(key, None)
        self.current_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # outputs that alias an input (views, in-place and out= ops) allocate nothing
        inputs = {id(a.untyped_storage()) for a in tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = id(st)
            if key in inputs or key in self._seen:
                continue
            nbytes = st.nbytes()
            self._seen[key] = weakref.ref(st, lambda _, k=key, n=nbytes: self._freed(k, n))
            self.current_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        return out
