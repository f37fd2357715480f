"""Names shared across the capture package: constants, the logger, and how nodes are named
(op names, module paths)."""

from __future__ import annotations

import logging
import operator
import os
import re

import torch
import torch.fx
import torch.fx.config

log = logging.getLogger("autopart.capture")

METHODS = ("auto", "export", "fx")
LeafSpec = str | type[torch.nn.Module]

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_SCALAR_DTYPES = {bool: "bool", int: "int", float: "float"}
_COMPARISONS = (operator.eq, operator.ne)
_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device, torch.layout)


def _storage_id(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _op_name(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node.op == "call_method":
        return f"method.{node.target}"
    if node.op == "call_module":
        cls = type(gm.get_submodule(node.target))
        return f"module.{cls.__module__}.{cls.__qualname__}"
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.name()}"
    module = getattr(target, "__module__", None) or ""
    module = {"_operator": "operator", "builtins": ""}.get(module, module)
    name = getattr(target, "__name__", None) or repr(target)
    return f"{module}.{name}" if module else name


def _module_path(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return _normalize_path(str(list(stack.values())[-1][0]))


def _normalize_path(path: str) -> str:
    """Module paths as `named_modules()` spells them, whichever tracer wrote them
    (non-strict export: ``h.0.attn``; dynamo: ``L['self'].h[0].attn``)."""
    if path.startswith("_empty_nn_module_stack"):
        return ""
    previous = None
    while previous != path:
        previous = path
        path = re.sub(r"getattr\(([^()]*), '([^']*)'\)", r"\1.\2", path)
    path = re.sub(r"^(?:L\['self'\]|self)(?=$|[.\[])", "", path)
    path = re.sub(r"\[(?:'([^']*)'|(\d+))\]", lambda m: "." + (m.group(1) or m.group(2)), path)
    return path.strip(".")
