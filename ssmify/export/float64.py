"""Float64 throughout: run transformers' modeling code in float64 without its hard float32 downcasts.

transformers computes some sub-steps in float32 whatever the input dtype: every RMSNorm
(`hidden_states.to(torch.float32)`), the gated RMSNorm of the Mamba-2 mixers, their chunked scan
(`x.float()`, `B.float()`, `C.float()`, `dt.float()`, `A_log.float()`), the recurrent update and eager
attention's softmax (`dtype=torch.float32`). A model cast to float64 therefore still rounds to float32
there, and two models that compute the same function agree only to about 1e-7 relative. Inside
`Float64Throughout()` a float64 tensor is never cast down to float32, so both models compute their own
math in float64 from end to end, and two exact equivalents agree to float64 rounding (about 1e-15).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


def _wide(value: Any) -> Any:
    return torch.float64 if value is torch.float32 else value


class Float64Throughout(TorchFunctionMode):
    """Context manager: `.float()`, `.to(torch.float32)` and `dtype=torch.float32` leave a float64 tensor
    float64. Tensors of other dtypes (integer positions, float32 buffers) are cast as the code asks."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if args and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.float64:
            if func is torch.Tensor.float:
                return args[0]
            if func is torch.Tensor.to:
                args = (args[0], *map(_wide, args[1:]))
            if "dtype" in kwargs:
                kwargs = {**kwargs, "dtype": _wide(kwargs["dtype"])}
        return func(*args, **kwargs)


@contextmanager
def as_float64(model: nn.Module) -> Iterator[nn.Module]:
    """`model` converted to float64 in place, and back to its dtype on exit (float32 -> float64 -> float32
    is lossless): no second copy of the weights."""
    dtype = next(model.parameters()).dtype
    model.to(torch.float64)
    try:
        yield model
    finally:
        model.to(dtype)
