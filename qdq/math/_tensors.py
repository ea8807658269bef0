"""A value as a float32 tensor, without the copy (or, under jit tracing, the constant) ``torch.as_tensor`` makes of
a tensor that already is one."""

from __future__ import annotations

import torch


def float32_tensor(value, device: torch.device | str | None = None) -> torch.Tensor:
    """``value`` as a float32 tensor on ``device`` (default: where a tensor is, the CPU for numbers); a float32
    tensor already there is returned as it is, so a traced graph keeps its data flow (jit tracing would record
    ``torch.as_tensor`` of it as a constant, with a TracerWarning).

    >>> t = torch.ones(2)
    >>> float32_tensor(t) is t, float32_tensor(3).dtype
    (True, torch.float32)
    """
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32 and (
            device is None or value.device == torch.device(device)):
        return value
    return torch.as_tensor(value, dtype=torch.float32, device=device)
