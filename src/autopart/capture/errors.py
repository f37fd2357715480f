"""Capture errors users can act on: the failing op, the module it came from and the line of
the user's code, instead of a tracer's traceback."""

from __future__ import annotations

import linecache

import torch
import torch.fx
import torch.fx.config

from autopart.capture.common import _TORCH_DIR
from autopart.errors import CaptureError


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _locate(exc: BaseException, model: torch.nn.Module) -> tuple[str, str, str] | None:
    """The innermost frame of model code in the exception chain, as (module path, module
    class, source line): the traceback still holds each frame's ``self``."""
    modules = {id(m): name for name, m in model.named_modules()}
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 8:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for error in chain:
        frames = []
        tb = error.__traceback__
        while tb is not None:
            frames.append((tb.tb_frame, tb.tb_lineno))
            tb = tb.tb_next
        for frame, lineno in reversed(frames):
            owner = frame.f_locals.get("self")
            filename = frame.f_code.co_filename
            if id(owner) in modules and not filename.startswith(_TORCH_DIR):
                line = linecache.getline(filename, lineno).strip()
                return modules[id(owner)], type(owner).__name__, line
    return None


def _capture_error(
    model: torch.nn.Module, failures: list[tuple[str, BaseException]], strict: bool
) -> CaptureError:
    where = next(filter(None, (_locate(exc, model) for _, exc in failures)), None)
    leaf = ""
    if where is None:
        subject = f"cannot capture {type(model).__name__}"
        leaf = (
            "; or mark the failing submodule as a leaf, which runs whole on one stage "
            "(autopart.Module(..., leaf_modules=['path.of.it']))"
        )
    else:
        path, cls, line = where
        module = f"module '{path}' ({cls})" if path else f"the top-level forward ({cls})"
        subject = f"cannot capture {type(model).__name__}: `{line}` in {module} is not traceable"
        if path:  # the whole model as a leaf would leave nothing to partition
            leaf = (
                "; or mark it as a leaf, which runs whole on one stage "
                f"(autopart.Module(..., leaf_modules=[{path!r}]))"
            )
    reasons = "\n".join(f"  {tracer}: {_first_line(exc)}" for tracer, exc in failures)
    advice = (
        "What to do: replace data-dependent Python control flow with tensor ops "
        f"(torch.where, torch.cond){leaf}; or wrap a free function fx cannot trace with "
        "torch.fx.wrap."
    )
    return CaptureError(f"{subject}.\n{reasons}\n{advice}")
