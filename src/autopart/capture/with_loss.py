"""``loss_fn=``: a loss computed outside the model, folded into the captured graph.

1F1B needs the loss inside the model call (`autopart.ir.loss`).  A training script that
computes it outside, ``loss = loss_fn(model(x), y)``, gets the same by passing ``loss_fn=``:
the wrapped model is then called as ``model(x, target=y)`` and returns ``loss_fn(model(x), y)``.
The loss's ops are captured with the model's, so its per-row parts are recognized like a
loss the model computes itself, and the pipeline can back-propagate it microbatch by
microbatch.

`WithLoss` presents the model's own children, parameters and buffers under the model's own
names (it shares their dictionaries), so state dicts, the optimizer and every name autopart
reports stay the user's.  The model itself is kept outside the module tree, and
``train()``/``eval()`` are passed on to it, because ``forward`` may read its ``training``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from autopart.errors import AutopartError

#: The keyword that carries the target of ``loss_fn``.
TARGET = "target"


class WithLoss(nn.Module):
    """``model`` followed by ``loss_fn(output, target)``, under the model's own names."""

    inner: nn.Module
    loss_fn: Callable[[Any, Any], Any]

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Any], Any]) -> None:
        super().__init__()
        self.__dict__["inner"] = model
        self.__dict__["loss_fn"] = loss_fn
        # The same dictionaries, not copies: the model's names, and later changes, are ours.
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        self._non_persistent_buffers_set = model._non_persistent_buffers_set

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if TARGET not in kwargs:
            raise AutopartError(
                f"a model wrapped with loss_fn= is called as model(..., {TARGET}=...): "
                "the target the loss compares the output with"
            )
        target = kwargs.pop(TARGET)
        return self.loss_fn(self.inner(*args, **kwargs), target)

    def train(self, mode: bool = True) -> WithLoss:
        super().train(mode)
        self.inner.training = mode
        return self
