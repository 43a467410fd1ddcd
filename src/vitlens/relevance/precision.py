"""Precision: the one vocabulary (``PRECISIONS``) and how each is carried out.

``float32_precision`` pins torch's float32 matmul/convolution switches for a block;
``plan`` turns a user's ``precision=`` into a ``Precision`` (compute dtype, matmul dtype,
whether matmuls round).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

PRECISIONS = ("float64", "float32", "tf32", "bf16")


# torch's float32 precision switches (torch >= 2.9): matmuls and convolutions, per backend
_FP32_SWITCHES = ("cuda.matmul", "cudnn.conv", "mkldnn.matmul", "mkldnn.conv")


@contextlib.contextmanager
def float32_precision(tf32: bool):
    """Float32 matmuls and convolutions in full precision (``tf32=False``) or TF32 for the
    duration of the block, whatever torch's global setting (``set_float32_matmul_precision``,
    ``allow_tf32``, ``cudnn.allow_tf32`` which is on by default); each switch is restored to
    exactly what it was. Not thread-safe: the switches are process-wide."""
    switches = []
    for path in _FP32_SWITCHES:
        obj = torch.backends
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            switches.append(obj)
    if not switches:  # older torch: the legacy switches
        old = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(old[0])
            torch.backends.cudnn.allow_tf32 = old[1]
        return
    saved = [s.fp32_precision for s in switches]
    try:
        for s in switches:
            s.fp32_precision = "tf32" if tf32 else "ieee"
        yield
    finally:
        for s, value in zip(switches, saved):
            s.fp32_precision = value



class Precision(NamedTuple):
    """How ``precision`` is carried out (see ``explain``)."""

    dtype: torch.dtype  # the forward's records and the rules' elementwise arithmetic
    mm_dtype: torch.dtype  # the rules' matmuls (and the Linear layers of a fast forward)
    rounding: bool  # those matmuls round their inputs: bf16, fp16 or TF32
    tf32: bool  # the rounding is TF32's (float32 tensors, torch's TF32 switch)


def plan(precision: str | None, param_dtype: torch.dtype) -> Precision:
    """``precision`` (None: the model's parameter dtype) -> a ``Precision``."""
    if precision is None:
        if param_dtype in (torch.float32, torch.float64):
            return Precision(param_dtype, param_dtype, False, False)
        return Precision(torch.float32, param_dtype, True, False)  # half / bf16 models: their dtype for matmuls
    if precision == "float64":
        return Precision(torch.float64, torch.float64, False, False)
    if precision == "float32":
        return Precision(torch.float32, torch.float32, False, False)
    if precision == "tf32":
        return Precision(torch.float32, torch.float32, True, True)
    if precision == "bf16":
        return Precision(torch.float32, torch.bfloat16, True, False)
    raise ValueError(f"unknown precision {precision!r}; choose None or one of {', '.join(PRECISIONS)}")
