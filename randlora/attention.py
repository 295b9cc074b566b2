"""Adapted layers whose parent reads their weight instead of calling them: torch's attention modules.

- ``nn.MultiheadAttention`` never calls its ``out_proj`` module: both its paths (the fused
  ``torch._native_multi_head_attention`` and ``F.multi_head_attention_forward``) read ``out_proj.weight``.
  An adapted ``out_proj`` is applied by a forward pre-hook on the attention module that puts ``W + s·ΔW``
  (:meth:`RandLoraLinear.adapted_weight`: differentiable, equal to the merged weight) in place of the
  layer's ``weight`` for the duration of the attention's forward, as ``torch.func.functional_call`` swaps
  parameters, and a forward hook (run on exceptions too) that puts the Parameter back. While swapped the
  layer is ``disabled``, so a call of ``out_proj`` itself computes ``x (W + s·ΔW)ᵀ + b`` once, not twice.
- ``nn.TransformerEncoderLayer``'s fused fast path (``torch._transformer_encoder_layer_fwd``, eval under
  ``no_grad``) reads ``linear1``, ``linear2`` and ``out_proj`` weights directly. torch skips it when any of
  the layer's modules has a forward hook; a layer holding an adapted layer gets a no-op pre-hook that says
  so (feeding the fast path ``W + s·ΔW`` instead would change the route of ``linear1``/``linear2`` in every
  other call).
- ``nn.TransformerEncoder`` with ``enable_nested_tensor`` turns a padded eval batch into a nested tensor for
  that fast path; a stack holding an adapted layer has ``use_nested_tensor`` off (its value is kept and put
  back).

:func:`sync` installs these where a module holds an adapted layer and removes them where none is left;
``inject`` calls it after swapping the layers in, ``eject`` / ``merge`` after swapping them out (a merged
model takes torch's fast paths again). Hooks are recognised by their function, so a ``copy.deepcopy`` or a
pickled model carries them and a later :func:`sync` still finds them. A layer put back by
``randlora.delete`` (its last adapter removed while others stay) leaves them in place until the next
``eject`` / ``merge``: harmless (the pre-hook finds a plain ``out_proj``), the encoder layer only keeps
torch's slower path meanwhile.
"""

from __future__ import annotations

from torch import nn

from .errors import ConfigError, StateError
from .layer import RandLoraLinear
from .paths import walk

__all__ = ["sync", "guarded"]

_NESTED = "_randlora_use_nested_tensor"  # a stack's own use_nested_tensor, kept while it is off


def _holds_adapter(mod: nn.Module) -> bool:
    return any(isinstance(m, RandLoraLinear) for _, m in walk(mod))


def _swap_in(mha: nn.MultiheadAttention, args) -> None:
    """Pre-hook: ``out_proj``'s weight becomes ``W + s·ΔW`` of the active adapter for this forward."""
    layer = mha._modules.get("out_proj")
    if not isinstance(layer, RandLoraLinear) or layer.disabled or layer.merged:
        return
    ad = layer.adapter()
    if ad is None:
        return
    if layer.training and ad.drops:
        raise ConfigError("the adapter on out_proj of an nn.MultiheadAttention has input dropout, which cannot apply "
                          "there: the attention module reads out_proj.weight instead of calling the layer, so only "
                          "W + s·ΔW reaches its output. Inject with dropout=0, or leave out_proj out "
                          "(exclude=['out_proj'])")
    from .serving import inside_mixed  # (serving imports the walker, which imports this module)

    if inside_mixed(layer.bank):
        raise StateError("randlora.mixed cannot give the rows of one batch their own adapters on out_proj of an "
                         "nn.MultiheadAttention: the attention module reads one out_proj.weight for the whole "
                         "batch. Run each adapter's rows as a batch of their own (randlora.use(model, name))")
    W = layer._parameters["weight"]
    weff = layer.adapted_weight(ad)
    layer._parameters["weight"] = weff.t() if layer.fan_in_fan_out else weff
    layer.__dict__["_randlora_weight"] = W
    layer.disabled = True


def _swap_out(mha: nn.MultiheadAttention, args, output) -> None:
    """Forward hook (also on exceptions): ``out_proj``'s own weight Parameter back."""
    layer = mha._modules.get("out_proj")
    W = layer.__dict__.pop("_randlora_weight", None) if layer is not None else None
    if W is not None:
        layer._parameters["weight"] = W
        layer.disabled = False


def _slow_path(mod: nn.Module, args) -> None:
    """Pre-hook marker: torch's ``TransformerEncoderLayer`` skips its fused fast path while a hook is attached."""


def _ours(mod: nn.Module) -> list[tuple[dict, int]]:
    return [(d, k) for d in (mod._forward_pre_hooks, mod._forward_hooks) for k, f in d.items()
            if f in (_swap_in, _swap_out, _slow_path)]


def _set_hooks(mod: nn.Module, want: bool, hooks) -> None:
    have = _ours(mod)
    if want and not have:
        mod.register_forward_pre_hook(hooks[0])
        if len(hooks) > 1:
            mod.register_forward_hook(hooks[1], always_call=True)
    elif have and not want:
        for d, k in have:
            del d[k]
            mod._forward_hooks_always_called.pop(k, None)


def _set_nested(stack: nn.TransformerEncoder, want_off: bool) -> None:
    if want_off and _NESTED not in stack.__dict__:
        stack.__dict__[_NESTED] = getattr(stack, "use_nested_tensor", False)
        stack.use_nested_tensor = False
    elif not want_off and _NESTED in stack.__dict__:
        stack.use_nested_tensor = stack.__dict__.pop(_NESTED)


def sync(model: nn.Module) -> None:
    """Install the hooks and flags above on every attention module / encoder layer / encoder stack of
    ``model`` that holds an adapted layer, and remove them from every one that no longer does.

    Args:
        model: the adapter's root (or any module); walked once, adapted layers not entered.
    """
    for _, mod in walk(model):
        if isinstance(mod, nn.MultiheadAttention):
            _set_hooks(mod, isinstance(mod._modules.get("out_proj"), RandLoraLinear), (_swap_in, _swap_out))
        elif isinstance(mod, nn.TransformerEncoderLayer):
            _set_hooks(mod, _holds_adapter(mod), (_slow_path,))
        elif isinstance(mod, nn.TransformerEncoder):
            _set_nested(mod, _holds_adapter(mod))


def guarded(mod: nn.Module) -> bool:
    """Whether :func:`sync` has installed its hooks or flag on ``mod``.

    Returns:
        True while ``mod`` carries this module's hooks or has its ``use_nested_tensor`` turned off by it.
    """
    return bool(_ours(mod)) or _NESTED in mod.__dict__
