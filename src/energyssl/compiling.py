"""``--compile``: ``torch.compile`` of a module's forward pass, with a way back to eager.

The forward is compiled, not the optimizer step: AOT autograd derives the backward of what the
forward graph holds. For the energy method that is the whole restoration (forward, the input
gradient by ``torch.func.grad``, the loss), so its double backward is compiled as one graph's
backward, with no private flag (see :meth:`.methods.energy.model.EnergyModel.energy_grad`).
DDP wraps the module after this, so it sees ordinary parameter gradients.

Where the installed torch cannot compile the module (dynamo or the backend fails on the first
call), the run says so in one line and goes on eagerly; it never stops for that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import UserError


def check_backend(backend: str | None) -> None:
    if backend is not None and backend not in torch.compiler.list_backends(exclude_tags=()):
        known = ", ".join(torch.compiler.list_backends())
        raise UserError(f"--compile {backend}: not a torch.compile backend here (known: {known})")


def compile_forward(module: nn.Module, backend: str, announce: bool = True, attribute: str = "forward") -> None:
    """Replace ``module.<attribute>`` by its compiled version. The first call compiles; if that
    fails, one line says why and the eager function takes over for good (the call is rerun
    eagerly, so an error of the model itself is still raised, by eager code)."""
    eager: Callable[..., Any] = getattr(module, attribute)
    compiled = torch.compile(eager, backend=backend)
    first = [True]

    def call(*args: Any, **kwargs: Any) -> Any:
        if not first[0]:
            return compiled(*args, **kwargs)
        try:
            out = compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 -- whatever stops the compiler, eager is the answer
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            if announce:
                print(f"--compile: {type(module).__name__} could not be compiled ({reason}); running eagerly")
            setattr(module, attribute, eager)
            return eager(*args, **kwargs)
        first[0] = False
        return out

    setattr(module, attribute, call)
