"""Adapted layers whose parent reads their weight instead of calling them: torch's attention modules.

- ``nn.MultiheadAttention`` never calls its ``out_proj`` module: both its paths (the fused
  ``torch._native_multi_head_attention`` and ``F.multi_head_attention_forward``) read ``out_proj.weight``.
  An adapted ``out_proj`` is applied by a forward pre-hook on the attention module that puts ``W + s·ΔW``
  (:meth:`RandLoraLinear.adapted_weight`: differentiable, equal to the merged weight) in place of the
  layer's ``weight`` for the duration of the attention's forward, as ``torch.func.functional_call`` swaps
  parameters, and a forward hook (run on exceptions too) that puts the Parameter back. While swapped the
  layer is ``disabled``, so a call of ``out_proj`` itself computes ``x (W + s·ΔW)ᵀ + b`` once, not twice.
- ``nn.MultiheadAttention.in_proj_weight`` (q, k and v as one ``(3·E) × E`` matrix, ``kdim == vdim == embed_dim``)
  is adapted by a :class:`RandLoraInProj` registered as the attention module's child ``in_proj``: the path
  files and ``targets`` name (``<attention>.in_proj``: ``λ`` at ``<attention>.in_proj.randlora_lambda``). It
  registers no weight of its own: its ``weight`` / ``bias`` read the attention module's ``in_proj_weight`` /
  ``in_proj_bias``, which stay where they were (the model's ``state_dict`` keys do not change). The same
  pre-hook swaps ``W + s·ΔW`` into ``in_proj_weight`` for the call, so torch's fused
  ``_native_multi_head_attention`` (eval under ``no_grad``) computes with it too; the forward hook puts the
  Parameter back. :func:`remove_in_proj` takes the child off again (``eject``, ``merge``, ``delete``).
- ``nn.TransformerEncoderLayer``'s fused fast path (``torch._transformer_encoder_layer_fwd``, eval under
  ``no_grad``) reads ``in_proj_weight``, ``linear1``, ``linear2`` and ``out_proj`` weights directly. torch
  skips it when any of the layer's modules has a forward hook; a layer holding an adapted layer gets a no-op
  pre-hook that says so (feeding the fast path ``W + s·ΔW`` instead would change the route of
  ``linear1``/``linear2`` in every other call).
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

from .errors import ConfigError, StateError, TargetError
from .layer import RandLoraLinear
from .ops import acc_dtype
from .paths import walk

__all__ = ["sync", "guarded", "InProj", "RandLoraInProj", "in_proj_of", "remove_in_proj", "IN_PROJ"]

IN_PROJ = "in_proj"  # the child an adapted in_proj_weight is held by: targets and files name <attention>.in_proj


class InProj:
    """What :class:`RandLoraLinear` reads of a base layer, for an ``nn.MultiheadAttention``'s ``in_proj_weight``
    (``weight`` ``(3·E, E)``, ``bias``); a plain object (``inject`` plans with it, nothing registers it)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        self.mha, self.weight, self.bias = mha, mha.in_proj_weight, mha.in_proj_bias


def in_proj_of(mha: nn.MultiheadAttention) -> InProj:
    """The :class:`InProj` of ``mha`` for :func:`randlora.inject`.

    Raises:
        TargetError: ``mha`` has ``kdim`` / ``vdim`` other than ``embed_dim`` (three separate weights).
    """
    if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
        raise TargetError(f"this nn.MultiheadAttention has kdim={mha.kdim}, vdim={mha.vdim} != embed_dim="
                          f"{mha.embed_dim}: q, k and v are three separate weights (q_proj_weight, k_proj_weight, "
                          "v_proj_weight), not the one in_proj_weight RandLora adapts. Target its out_proj alone, "
                          "or leave it out (exclude=[...])")
    return InProj(mha)


class RandLoraInProj(RandLoraLinear):
    """The adapter of an ``nn.MultiheadAttention``'s ``in_proj_weight`` (``O = 3·E``, ``I = E``), the attention
    module's child ``in_proj``. ``weight`` / ``bias`` are the attention module's ``in_proj_weight`` /
    ``in_proj_bias`` (not registered here: the keys stay the attention's); the pre-hook of :func:`sync`
    applies it, since the attention module reads the weight and never calls this layer."""

    kind = "attention in_proj"

    def __init__(self, base: InProj, bank, **kw) -> None:
        super().__init__(base, bank, **kw)
        for k in ("weight", "bias"):  # read from the attention module instead (__getattr__)
            self._parameters.pop(k, None)
            self.__dict__.pop(k, None)
        object.__setattr__(self, "_mha", base.mha)

    def __getattr__(self, name: str):
        mha = self.__dict__.get("_mha")
        if mha is not None and name in ("weight", "bias"):
            held = self.__dict__.get("_randlora_weight") if name == "weight" else None  # while W + s·ΔW is in
            return held if held is not None else mha._parameters[f"in_proj_{name}"]
        return super().__getattr__(name)

    def forward(self, x):
        raise StateError("the in_proj adapter of an nn.MultiheadAttention is applied by the attention module's "
                         "forward (it reads in_proj_weight), not called on its own: call the attention module")


def remove_in_proj(mha: nn.Module) -> None:
    """Take ``mha``'s :class:`RandLoraInProj` child off (the attention module keeps its own weights)."""
    mha._modules.pop(IN_PROJ, None)

_NESTED = "_randlora_use_nested_tensor"  # a stack's own use_nested_tensor, kept while it is off


def _holds_adapter(mod: nn.Module) -> bool:
    return any(isinstance(m, RandLoraLinear) for _, m in walk(mod))


def _adapted(mha: nn.MultiheadAttention):
    """``(role, layer, dict holding its weight, key)`` of each adapted layer the attention module reads."""
    out, inp = mha._modules.get("out_proj"), mha._modules.get(IN_PROJ)
    if isinstance(inp, RandLoraInProj):
        yield IN_PROJ, inp, mha._parameters, "in_proj_weight"
    if isinstance(out, RandLoraLinear):
        yield "out_proj", out, out._parameters, "weight"


def _checked(role: str, layer: RandLoraLinear, ad) -> None:
    if layer.training and ad.drops:
        raise ConfigError(f"the adapter on {role} of an nn.MultiheadAttention has input dropout, which cannot apply "
                          f"there: the attention module reads {role} weight instead of calling the layer, so only "
                          f"W + s·ΔW reaches its output. Inject with dropout=0, or leave {role} out "
                          f"(exclude=['{role}'])")
    from .serving import inside_mixed  # (serving imports the walker, which imports this module)

    if inside_mixed(layer.bank):
        raise StateError(f"randlora.mixed cannot give the rows of one batch their own adapters on {role} of an "
                         f"nn.MultiheadAttention: the attention module reads one {role} weight for the whole "
                         "batch. Run each adapter's rows as a batch of their own (randlora.use(model, name))")


def _unsharded(role: str, layer: RandLoraLinear) -> None:
    """Refuse a layer whose parameters are still sharded (``DTensor``) when the attention module runs: FSDP2
    gathers a module's parameters when that module is called, and the attention module never calls this one."""
    if any(hasattr(p, "full_tensor") for p in (layer.weight, *layer.parameters())):
        raise StateError(f"{role} of this nn.MultiheadAttention is sharded on its own (fully_shard / DTensor "
                         f"parameters): the attention module reads its weight without calling {role}, so FSDP2 "
                         f"never gathers {role}'s parameters for the attention's forward. fully_shard the "
                         f"attention module or a module above it (the encoder/decoder layer), not {role} alone")


def _weight_now(role: str, layer: RandLoraLinear):
    """The ``(O, I)`` weight the attention module must read for ``layer`` now, or None for its own Parameter:
    ``W + s·ΔW`` of the active adapter, or, merged and disabled, ``W − s·ΔW`` of the merged one (the base).

    Raises:
        StateError: ``layer``'s parameters are sharded (:func:`_unsharded`).
    """
    _unsharded(role, layer)
    if layer.merged:
        if not layer.disabled:
            return None
        W = layer.weight_matrix()
        acc = acc_dtype(W.dtype)
        return (W.to(acc) - layer.delta_weight(acc, layer.merged_name)).to(W.dtype)
    ad = None if layer.disabled else layer.adapter()
    if ad is None:
        return None
    _checked(role, layer, ad)
    return layer.adapted_weight(ad)


def _swap_in(mha: nn.MultiheadAttention, args) -> None:
    """Pre-hook: each adapted weight (``in_proj_weight``, ``out_proj.weight``) becomes what :func:`_weight_now`
    says for this forward (all built before any is swapped: a refusal leaves the Parameters in place)."""
    todo = []
    for role, layer, params, key in _adapted(mha):
        weff = _weight_now(role, layer)
        if weff is not None:
            todo.append((layer, params, key, weff.t() if layer.fan_in_fan_out else weff))
    for layer, params, key, weff in todo:  # the weight swapped in is the layer's whole weight for now: a call of
        layer.__dict__["_randlora_weight"] = params[key]  # the layer itself computes x weffᵀ + b, once
        layer.__dict__["_randlora_switches"] = (layer.disabled, layer.merged_name)
        params[key] = weff
        layer.disabled, layer.merged_name = True, None


def _swap_out(mha: nn.MultiheadAttention, args, output) -> None:
    """Forward hook (also on exceptions): the adapted layers' own weight Parameters (and switches) back."""
    for _, layer, params, key in _adapted(mha):
        W = layer.__dict__.pop("_randlora_weight", None)
        if W is not None:
            params[key] = W
            layer.disabled, layer.merged_name = layer.__dict__.pop("_randlora_switches")


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
            _set_hooks(mod, any(True for _ in _adapted(mod)), (_swap_in, _swap_out))
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
