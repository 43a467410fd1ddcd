"""Device-free stand-ins for GPU measurements: peak tensor memory, and TF32 numerics.

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

``EmulatedTF32`` makes a CPU round float32 matmuls and convolutions to TF32 whenever torch's
switch asks for TF32, as an Ampere+ GPU does (CPUs ignore the switch), so code that must or
must not run in TF32 can be tested without a GPU.
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


def tf32_round(t):
    """``t`` with float32 values rounded to TF32 (10-bit mantissa, to nearest); other values
    and dtypes unchanged."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
        return t
    return ((t.contiguous().view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


class EmulatedTF32(TorchDispatchMode):
    """While torch's switch for CPU matmuls (``torch.backends.mkldnn.matmul.fp32_precision``,
    set by ``torch.set_float32_matmul_precision("high")``) or convolutions
    (``mkldnn.conv.fp32_precision``) says ``"tf32"``, round the float32 inputs of every
    matmul (convolution) to TF32 (needs torch >= 2.9)."""

    _MM = {torch.ops.aten.mm.default: (0, 1), torch.ops.aten.bmm.default: (0, 1),
           torch.ops.aten.addmm.default: (1, 2), torch.ops.aten.baddbmm.default: (1, 2)}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._MM and torch.backends.mkldnn.matmul.fp32_precision == "tf32":
            args = tuple(tf32_round(a) if i in self._MM[func] else a for i, a in enumerate(args))
        elif (func is torch.ops.aten.convolution.default
              and torch.backends.mkldnn.conv.fp32_precision == "tf32"):
            args = (tf32_round(args[0]), tf32_round(args[1]), *args[2:])
        return func(*args, **kwargs)
