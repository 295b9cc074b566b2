"""Removing named adapters: :func:`delete` takes any adapter off a model, the first one included.

Adding one is :func:`randlora.inject` with ``name=`` (or :func:`randlora.load` with a new ``name``); which one is
active is :func:`randlora.use`'s. The layers hold adapters as :class:`randlora.layer.RandLoraLinear` describes.
"""

from __future__ import annotations

from torch import nn

from . import attention
from .errors import StateError
from .layer import RandLoraLinear
from .paths import examples, on_root
from .serving import inside_mixed
from .experts import RandLoraParameter, detach, parameter_units
from .walker import _adapted_modules, eject, registry_of, require_bank, unwrap

__all__ = ["delete", "drop"]


@on_root
def delete(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` (any of them, the first included) and free its ``λ``/``γ``.

    Its parameters leave the model, ``named_parameters()`` and the registry; the other adapters are untouched
    and the model computes what it would have computed had ``name`` never been added. A layer that carried
    only ``name`` gets its original module back (with the ``requires_grad`` flags ``inject`` would have given
    it). When ``name`` was active, the adapter added after it becomes active (or, if it was the newest, the
    one added before it). Deleting the only adapter is :func:`randlora.eject`: the original model comes back.
    An optimizer built over the old parameters still holds them: build it again to free them there too.

    Raises:
        StateError: the model has no adapter, no adapter ``name`` (the error lists its adapters), is merged,
            or is inside ``randlora.mixed``. The model is left as it was.
    """
    bank = require_bank(model)
    reg = registry_of(model)
    if not isinstance(name, str) or name not in reg.adapters:
        names = list(reg.adapters)
        shown = repr(names) if len(names) <= 10 else f"[{examples(names, 10)}]"
        raise StateError(f"the model has no adapter {name!r} to delete; its adapters are {shown}. Pass one of those "
                         "names")
    layers = list(_adapted_modules(model)) + list(parameter_units(model))
    merged = [(p, l.merged_name) for p, l in layers if l.merged]
    if merged:
        raise StateError(f"the model is merged (adapter {merged[0][1]!r} is folded into the weights of "
                         f"{merged[0][0]!r} and others), so deleting adapter {name!r} now could not be undone by "
                         f"unmerge; nothing was deleted. Call randlora.unmerge(model) first, then delete")
    if inside_mixed(bank):
        raise StateError(f"the model is inside randlora.mixed(...), whose rows name its adapters, so adapter "
                         f"{name!r} cannot be deleted there; nothing was deleted. Leave the block first, then delete")
    if len(reg.adapters) == 1:
        eject(model)
        return
    drop(model, name, layers)


def drop(model: nn.Module, name: str, layers: list[tuple[str, RandLoraLinear]] | None = None) -> None:
    """Remove adapter ``name`` from the adapter root ``model`` without the checks of :func:`delete` (the model
    keeps at least one other adapter). ``layers``: ``(real path, layer)`` of every adapted layer and adapted
    parameter, if known."""
    reg = registry_of(model)
    if layers is None:
        layers = list(_adapted_modules(model)) + list(parameter_units(model))
    freeze_bias = reg.adapters[name].bias == "randlora_only"
    for path, layer in layers:
        if layer.adapter(name) is None:
            continue
        if layer.adapter_names() == [name] and isinstance(layer, RandLoraParameter):
            detach(layer)  # the parameter computes as before inject
        elif layer.adapter_names() == [name]:  # no adapter left here: the original module, as inject never took it
            unwrap(model, path, layer)
            if freeze_bias and layer.bias is not None:
                layer.bias.requires_grad_(False)
        else:
            layer.remove_adapter(name)
    attention.sync(model)  # a module that no longer holds an adapted layer takes torch's fast paths again
    names = list(reg.adapters)
    del reg.adapters[name]
    if reg.active == name:
        rest = list(reg.adapters)
        reg.active = rest[min(names.index(name), len(rest) - 1)]
