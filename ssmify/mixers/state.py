"""The recurrent state a mixer carries between decoding steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MixerState:
    """What one mixer layer remembers: constant in size, whatever the context length.

    conv: the last d_conv inputs of the causal conv, (batch, conv_dim, d_conv).
    ssm:  the SSM state, (batch, heads, head_dim, d_state).

    Mixers update both tensors in place, so a state object can live inside a transformers cache.
    """

    conv: torch.Tensor
    ssm: torch.Tensor

    @classmethod
    def zeros(
        cls,
        batch_size: int,
        conv_dim: int,
        d_conv: int,
        heads: int,
        head_dim: int,
        d_state: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> MixerState:
        return cls(
            conv=torch.zeros(batch_size, conv_dim, d_conv, device=device, dtype=dtype),
            # The SSM state accumulates over the whole context: keep it in fp32 whatever the weights are.
            ssm=torch.zeros(batch_size, heads, head_dim, d_state, device=device, dtype=torch.float32),
        )

    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.ssm.numel() * self.ssm.element_size()
