"""One hook mechanism for attribution, receptive fields and ablation (after baukit's nethook).

:class:`Trace` is a context manager on one module that can

* ``retain_input`` / ``retain_output``: keep the tensor the module reads / writes
  (still attached to the autograd graph, so ``torch.autograd.grad`` can be taken
  w.r.t. it afterwards — that is how attribution gets every layer from one backward);
* ``edit_input`` / ``edit_output``: replace that tensor by ``fn(tensor)``
  (ablation zeroes or mean-fills units this way).

:class:`TraceDict` opens several traces at once, keyed by name. Gotcha: edits are
applied before retention, so a retained tensor is what the module actually saw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

EditFn = Callable[[Tensor], Tensor]


class Trace(AbstractContextManager):
    """Hook one module; see the module docstring."""

    def __init__(
        self,
        module: nn.Module,
        *,
        retain_input: bool = False,
        retain_output: bool = False,
        edit_input: EditFn | None = None,
        edit_output: EditFn | None = None,
        detach: bool = False,
    ) -> None:
        self.module = module
        self.input: Tensor | None = None
        self.output: Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        keep = (lambda t: t.detach()) if detach else (lambda t: t)

        if retain_input or edit_input is not None:

            def pre_hook(_mod: nn.Module, args: tuple) -> tuple | None:
                x = args[0]
                if edit_input is not None:
                    x = edit_input(x)
                if retain_input:
                    self.input = keep(x)
                return (x, *args[1:]) if edit_input is not None else None

            self._handles.append(module.register_forward_pre_hook(pre_hook))

        if retain_output or edit_output is not None:

            def hook(_mod: nn.Module, _args: tuple, out: Tensor) -> Tensor | None:
                y = out
                if edit_output is not None:
                    y = edit_output(y)
                if retain_output:
                    self.output = keep(y)
                return y if edit_output is not None else None

            self._handles.append(module.register_forward_hook(hook))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, *exc: object) -> None:
        self.close()


class TraceDict(dict, AbstractContextManager):
    """Several :class:`Trace` objects at once: ``TraceDict({name: module}, **trace_kwargs)``.

    ``edit_input`` / ``edit_output`` may be a dict ``name -> fn`` to edit only some modules.
    """

    def __init__(self, modules: dict[str, nn.Module] | Iterable[tuple[str, nn.Module]], **kw) -> None:
        super().__init__()
        items = modules.items() if isinstance(modules, dict) else modules
        for name, mod in items:
            per = dict(kw)
            for key in ("edit_input", "edit_output"):
                if isinstance(per.get(key), dict):
                    per[key] = per[key].get(name)
            self[name] = Trace(mod, **per)

    def close(self) -> None:
        for t in self.values():
            t.close()

    def __exit__(self, *exc: object) -> None:
        self.close()
