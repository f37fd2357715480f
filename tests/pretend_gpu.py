"""A pretend GPU on a machine without one: fake tensors that say ``device='cuda'``.

``torch._subclasses.fake_tensor.FakeTensorMode`` makes tensors that report a CUDA device and
propagate devices through ops as CUDA would, raising the same "Expected all tensors to be on
the same device" errors, without a GPU or any real compute: so capture can be handed a batch
on the GPU in the CPU-only test suite.  (Running whole models on them is out of reach: some
ops and autograd ask a CUDA device guard for the device, which a CPU build aborts on.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode

CUDA = torch.device("cuda", 0)


def on_pretend_gpu(tree: Any, mode: FakeTensorMode) -> Any:
    """Fake CUDA twins of every tensor in ``tree`` (same shape, dtype and grad flag)."""

    def twin(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        with mode:
            fake = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=CUDA)
        return fake.requires_grad_(value.requires_grad)

    return pytree.tree_map(twin, tree)
