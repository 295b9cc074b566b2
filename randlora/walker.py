"""The adapter's lifecycle: inject (validate, plan, swap layers for ``RandLoraLinear``), named adapters,
merge / unmerge / eject, and the model-level state (bank, registry) every other module reads.

Which layers a call selects is :mod:`randlora.selection`'s job; the names it exports are re-exported here."""

from __future__ import annotations

import contextlib
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from . import attention, experts, offload
from .bank import BasisBank
from .errors import ConfigError, RandLoraError, StateError, TargetError
from .layer import RandLoraLinear
from .quantized import is_quantized
from .registry import DEFAULT_INIT, get_init
from .recipes import MODES, RECIPES, BankShape, bank_shape
from .paths import BANK_ATTR, canonical, compiled_inner, locate, on_root, walk
from .registry import BIAS_MODES, DEFAULT, AdapterConfig, Registry
from .experts import RandLoraParameter, adapted_parameters, parameter_units
from .selection import (adapted_class, is_bias_name, is_conv, is_conv1d, is_linear, kind_of, matrix_shape, select,
                        select_parameters, target_module)

__all__ = [
    "AdapterConfig",
    "InjectReport",
    "inject",
    "adapt",
    "eject",
    "disabled",
    "use",
    "adapter_names",
    "active_adapter",
    "adapted_layers",
    "adapted_weights",
    "bank_of",
    "require_bank",
    "registry_of",
    "config_of",
    "is_linear",
    "is_conv1d",
    "is_bias_name",
    "unwrap",
    "biases",
    "trainable_parameters",
    "summary",
    "BANK_ATTR",
]



@dataclass
class InjectReport:
    """What :func:`inject` did: the adapted layers, their shapes and the trainable count."""

    rows: list[tuple[str, int, int, int, int]]  # name, O, I, n, trainable
    trainable: int
    total: int
    bank: str
    experts: dict[str, int] = field(default_factory=dict)
    """The rows that are 3-D adapted parameters (``target_parameters``): name -> ``E``, the number of matrices
    (each with its own ``λ``, ``γ``; ``O``, ``I`` and ``n`` are one matrix's, the trainable count all ``E``'s)."""
    kinds: list[str] = field(default_factory=list)
    """Per row, what the adapted weight is: ``linear``, ``Conv2d 3x3``, ``attention in_proj``, ... (:func:`kind_of`)."""

    @property
    def names(self) -> list[str]:
        return [row[0] for row in self.rows]

    def __repr__(self) -> str:
        w = max([len("layer")] + [len(r[0]) for r in self.rows])
        ex = self.experts
        e_col = (lambda nm: f"  {ex.get(nm, '-'):>4}") if ex else (lambda nm: "")
        kinds = self.kinds or [""] * len(self.rows)
        k = max([len("kind")] + [len(x) for x in kinds])
        lines = [f"{'layer':<{w}}  {'kind':<{k}}  {'O':>6}  {'I':>6}  {'n':>5}" + ("  {:>4}".format("E") if ex else "")
                 + f"  {'trainable':>10}"]
        lines += [f"{nm:<{w}}  {kd:<{k}}  {o:>6}  {i:>6}  {n:>5}{e_col(nm)}  {t:>10,}"
                  for (nm, o, i, n, t), kd in zip(self.rows, kinds)]
        pct = 100.0 * self.trainable / max(self.total, 1)
        lines.append(f"{len(self.rows)} layers, {self.trainable:,} trainable of {self.total:,} ({pct:.3f}%); "
                     f"bank {self.bank}")
        return "\n".join(lines)


def _report(model: nn.Module, layers, bank: BasisBank) -> InjectReport:
    """The report of ``(name, layer)`` pairs: shapes, bases, trainable counts, totals of the model."""
    layers = list(layers)
    rows = [(n, l.out_features, l.in_features, l.n, l.randlora_lambda.numel() + l.randlora_gamma.numel())
            for n, l in layers]
    params = list(_parameters(model))
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return InjectReport(rows=rows, trainable=trainable, total=sum(p.numel() for p in params), bank=bank.extra_repr(),
                        experts={n: l.E for n, l in layers if getattr(l, "E", None) is not None},
                        kinds=[l.kind if isinstance(l, RandLoraParameter) else kind_of(l) for _, l in layers])


def _parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """``model.parameters()``, reading each adapted layer's adapters directly instead of walking them."""
    seen: set[int] = set()
    for _, mod in walk(model):
        held = [ad._parameters for ad in mod.adapters().values()] if isinstance(
            mod, (RandLoraLinear, RandLoraParameter)) else [mod._parameters]
        for p in (p for ps in held for p in ps.values()):
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                yield p


def biases(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every bias, as ``model.named_parameters()`` names them (without walking the
    adapters, which hold none)."""
    seen: set[int] = set()
    for path, mod in walk(model):
        p = mod._parameters.get("bias")
        if p is not None and id(p) not in seen:
            seen.add(id(p))
            yield (f"{path}.bias" if path else "bias"), p


# ------------------------------------------------------------------------------------------------
# model-level state
# ------------------------------------------------------------------------------------------------
def _check_module(model) -> None:
    if not isinstance(model, nn.Module):
        raise RandLoraError(f"expected a torch.nn.Module, got {type(model).__name__}")


def bank_of(model: nn.Module) -> BasisBank | None:
    """The model's basis bank, or None when it has no adapter."""
    _check_module(model)
    b = getattr(model, BANK_ATTR, None)
    return b if isinstance(b, BasisBank) else None


def require_bank(model: nn.Module) -> BasisBank:
    """The model's basis bank (with its registry); :class:`StateError` when the model has no adapter."""
    bank = bank_of(model)
    if bank is None or bank.registry is None:
        raise StateError("the model has no RandLora adapter; call randlora.inject(model, targets=...) first")
    return bank


def registry_of(model: nn.Module) -> Registry:
    """The model's adapter registry; :class:`StateError` when the model has no adapter."""
    return require_bank(model).registry  # type: ignore[return-value]


def config_of(model: nn.Module, name: str | None = None) -> AdapterConfig:
    """The settings of adapter ``name`` (default: the active one)."""
    return registry_of(model).config(name)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name) is None or hasattr(
            nn.ModuleDict(), name):
        raise ConfigError(f"adapter name must be an identifier such as 'default' or 'task_a' (letters, digits, _; "
                          f"no dots), got {name!r}")


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, RandLoraLinear]]:
    """``(path, layer)`` for every adapted layer; paths as files name them (:func:`randlora.paths.canonical`)."""
    for name, mod in _adapted_modules(model):
        yield canonical(name), mod


def adapted_weights(model: nn.Module) -> Iterator[tuple[str, RandLoraLinear | RandLoraParameter]]:
    """``(path, adapted)`` for every adapted weight: the adapted layers (:func:`adapted_layers`), then the adapted
    parameters (``target_parameters``, :class:`randlora.experts.RandLoraParameter`, named by the parameter's
    path). Both have ``adapter(name)``, ``adapters()``, ``merged``, ``merge_``, ``unmerge_``, ``delta_weight``."""
    yield from adapted_layers(model)
    yield from adapted_parameters(model)


def _adapted_modules(model: nn.Module) -> Iterator[tuple[str, RandLoraLinear]]:
    """``(real module path, layer)`` for every adapted layer (for ``get_submodule`` and swapping)."""
    for name, mod in walk(model):
        if isinstance(mod, RandLoraLinear):
            yield name, mod


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# ------------------------------------------------------------------------------------------------
# inject: validate -> plan -> apply
# ------------------------------------------------------------------------------------------------
def _validated_config(r, alpha, dropout, seed, bases, recipe, bias, init) -> AdapterConfig:
    """The validated settings (targets still empty): :class:`ConfigError` names the first bad one."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r <= 0:
        raise ConfigError(f"r must be a positive int, got {r!r}")
    start = get_init(init)
    if alpha is None:  # the scale measured best with this init (docs/benchmarks.md, "Scale and initialisation")
        alpha = start.alpha_scale * r
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < math.inf:
        raise ConfigError(f"alpha must be a positive finite number, got {alpha!r} "
                          f"(default: {start.alpha_scale:g} * r with init={init!r})")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ConfigError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
        raise ConfigError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if bases not in MODES:
        raise ConfigError(f"unknown bases {bases!r}; use one of {list(MODES)}")
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; use one of {sorted(RECIPES)}")
    if bias not in BIAS_MODES:
        raise ConfigError(f"unknown bias {bias!r}; use one of {list(BIAS_MODES)}")
    # numpy scalars -> plain Python numbers (JSON-able settings)
    return AdapterConfig(targets=[], r=int(r), alpha=float(alpha), init=init, dropout=float(dropout),
                         seed=int(seed), bases=bases, recipe=recipe, bias=bias)


@dataclass
class _Plan:
    """What :func:`inject` will do, fully validated; nothing has been changed yet."""

    modules: dict[str, nn.Module]
    shape: BankShape
    dtype: torch.dtype
    device: torch.device
    params: list[tuple[str, nn.Module, str]] = field(default_factory=list)  # (path, owner, name) of target_parameters


def _layer_facts(mods: dict[str, nn.Module]) -> tuple[list, list, set, set]:
    """``(matrix shapes, fan_in_fan_out paths, dtypes, devices)`` of the target layers, each checked."""
    shapes, fan, dtypes, devices = [], [], set(), set()
    for n, mod in mods.items():
        W = mod.weight
        if is_quantized(mod):  # bitsandbytes 4-/8-bit or torchao: packed storage, the module says the shape
            shapes.append((int(mod.out_features), int(mod.in_features)))
            cdt = getattr(mod, "compute_dtype", None)  # bitsandbytes 4-bit; torchao weights report theirs
            if not (isinstance(cdt, torch.dtype) and cdt.is_floating_point):
                cdt = W.dtype if W.is_floating_point() else torch.float32
            dtypes.add(cdt)
            devices.add(offload.compute_device(mod))
            continue
        if not W.is_floating_point():
            raise ConfigError(f"layer {n} has a {W.dtype} weight; RandLora needs floating-point weights or a "
                              "bitsandbytes 4-bit/8-bit layer (dequantise it or exclude it)")
        if (W.dim() != 2 and not is_conv(mod)) or 0 in W.shape:
            raise TargetError(f"layer {n} has a weight of shape {tuple(W.shape)}; RandLora needs a 2-D weight "
                              "with no zero-size dimension. Exclude it (exclude=[...])")
        if is_conv1d(mod):
            fan.append(n)
        shapes.append(matrix_shape(mod))
        dtypes.add(W.dtype)
        devices.add(offload.compute_device(mod))  # (accelerate's execution device for a dispatched layer)
    return shapes, fan, dtypes, devices


def _select_all(model: nn.Module, targets, target_parameters, cfg: AdapterConfig, layers, exclude
                ) -> tuple[list[str], list[tuple[str, nn.Module, str]]]:
    """The target layers' paths and the target parameters' ``(path, owner, name)``, checked against each other."""
    if targets is None and target_parameters is None:
        raise TargetError("nothing to adapt: pass targets=[...] (linear layers, e.g. ['q_proj', 'v_proj'] or "
                          "'all-linear') and/or target_parameters=[...] (2-D/3-D weight tensors such as MoE "
                          "experts' ['gate_up_proj', 'down_proj'])")
    names = select(model, targets, layers=layers, exclude=exclude) if targets is not None else []
    params = (select_parameters(model, target_parameters, layers=layers, exclude=exclude)
              if target_parameters is not None else [])
    both = [p for p, owner, _ in params if any(model.get_submodule(n) is owner for n in names)]
    if both:
        raise TargetError(f"parameters {both[:3]} belong to layers targets also selects; adapt each weight once: "
                          "drop them from target_parameters or exclude their layers from targets")
    if params and cfg.dropout:
        raise ConfigError(experts.NO_DROPOUT)
    return names, params


def _plan(model: nn.Module, targets, cfg: AdapterConfig, layers, exclude, target_parameters=None) -> _Plan:
    """Select and check the targets and size the bank; fills ``cfg.targets`` / ``fan_in_fan_out`` /
    ``target_parameters``."""
    taken = [a for a in (BANK_ATTR, *BasisBank.NAMES) if hasattr(model, a)]
    if taken:
        raise StateError(f"the model already has attributes {taken} that randlora needs for its bank; "
                         "rename them before injecting")
    names, params = _select_all(model, targets, target_parameters, cfg, layers, exclude)
    mods = {n: target_module(model, n) for n in names}  # (an attention module's in_proj: its InProj)
    shapes, fan, dtypes, devices = _layer_facts(mods)
    for _, owner, pname in params:  # a 3-D tensor's matrices are (a, b) each: the bank is sized for those
        W = owner._parameters[pname]
        shapes.append(tuple(W.shape[-2:]))
        dtypes.add(W.dtype)
        devices.add(W.device)
    device = offload.bank_device(model, mods, devices, cfg, params)  # (checks a model accelerate dispatched)
    largest = max(max(sh) for sh in shapes)
    if cfg.r > largest:
        raise ConfigError(f"r={cfg.r} is larger than the largest side of every targeted layer ({largest}): the "
                          f"bank would hold r-sized bases no layer can use (and a huge r runs out of memory). Pass "
                          f"r <= {largest}; smaller r means more bases (n = ceil(min(O, I) / r)) and more "
                          "trainable values")
    cfg.targets, cfg.fan_in_fan_out = [canonical(n) for n in names], [canonical(n) for n in fan]
    cfg.target_parameters = [canonical(p) for p, _, _ in params]
    return _Plan(modules=mods, shape=bank_shape(cfg.recipe, cfg.r, shapes),
                 dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32, device=device, params=params)


def _apply(model: nn.Module, plan: _Plan, cfg: AdapterConfig, name: str) -> dict[str, RandLoraLinear]:
    """Swap the planned layers, freeze the rest, attach the bank. Nothing here can fail half-way."""
    bank = BasisBank(seed=cfg.seed, mode=cfg.bases, recipe=cfg.recipe, shape=plan.shape, dtype=plan.dtype,
                     device=plan.device)
    new = {n: adapted_class(mod)(mod, bank, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, init=cfg.init,
                             fan_in_fan_out=n in cfg.fan_in_fan_out, name=name) for n, mod in plan.modules.items()}
    offload.place(new, plan.modules, bank)  # accelerate's hooks carried over (dispatched models only)
    units = {p: RandLoraParameter(owner, pname, bank, r=cfg.r, alpha=cfg.alpha, init=cfg.init, name=name)
             for p, owner, pname in plan.params}
    bank.registry = Registry(adapters={name: cfg}, active=name,
                             grad_flags={n: p.requires_grad for n, p in model.named_parameters()})
    for p in model.parameters():
        p.requires_grad_(False)
    for n, layer in new.items():
        _set_submodule(model, n, layer)
        if layer.quantized:
            continue  # its own forward computes x Wᵀ + b: it keeps its (shared) weight and bias
        # the wrapper owns weight/bias now; the kept original must not hold them as well (under FSDP2 it
        # would keep every adapted weight whole on every rank). _restore hands them back.
        layer.base_layer.weight = None
        if getattr(layer.base_layer, "bias", None) is not None:
            layer.base_layer.bias = None
    for unit in units.values():
        experts.attach(unit.owner, unit)
    bank.attach(model)
    setattr(model, BANK_ATTR, bank)
    for layer in [*new.values(), *units.values()]:
        layer.randlora_lambda.requires_grad_(True)
        layer.randlora_gamma.requires_grad_(True)
        if cfg.bias == "randlora_only" and layer.bias is not None:  # (an adapted parameter has none)
            layer.bias.requires_grad_(True)
    if cfg.bias == "all":
        for n, p in model.named_parameters():
            if is_bias_name(n):
                p.requires_grad_(True)
    attention.sync(model)  # parents that read an adapted layer's weight (nn.MultiheadAttention's out_proj)
    return {**new, **units}


def inject(
    model: nn.Module,
    targets: str | Sequence[str] | None = None,
    *,
    target_parameters: str | Sequence[str] | None = None,
    r: int = 32,
    alpha: float | None = None,
    init: str = DEFAULT_INIT,
    dropout: float = 0.0,
    seed: int = 0,
    bases: str = "dense",
    recipe: str = "portable",
    bias: str = "none",
    layers: Sequence[int] | None = None,
    exclude: str | Sequence[str] | None = None,
    name: str | None = None,
) -> InjectReport:
    """Replace the selected linear layers by :class:`RandLoraLinear` in place and freeze the rest.

    Each layer gets ``ΔW = Σ_i B_i diag(λ_i) A diag(γ_i)`` scaled by ``alpha / r``. Everything is
    validated before any module is swapped: on an error the model is left exactly as it was.

    Args:
        model: any ``nn.Module``; its ``nn.Linear`` (and GPT-2 ``Conv1D``) layers can be targets.
        targets: a list of names (a module whose full name equals an entry or ends with ``"." + entry``),
            one string (a regular expression that must match the full name), or ``"all-linear"`` (every
            linear layer except the output head). May be None when ``target_parameters`` is given.
        target_parameters: 2-D or 3-D ``nn.Parameter`` s to adapt by name (the same matching rule, on parameter
            names), e.g. ``["gate_up_proj", "down_proj"]`` for the fused experts of transformers' MoE models. A
            3-D ``(E, a, b)`` tensor is ``E`` matrices, each with its own ``λ`` ``(r, n)`` and ``γ`` ``(n, m)``,
            ``m = min(a, b)``; the parameter's module computes with ``W + s·ΔW`` (see :mod:`randlora.experts`).
        r: rank of each random basis; ``n = ceil(min(O, I) / r)`` bases per layer, ``n·r + n·min(O, I)``
            trainable values per layer. At most the largest side of the targeted layers.
        alpha: the update is scaled by ``alpha / r`` (default ``r`` with ``init="sqrt"``, ``6 · r`` with
            ``init="peft"``: the scales measured best for each, see docs/benchmarks.md).
        init: where training starts (``λ = 0`` either way, so the model starts unchanged): ``"sqrt"``,
            ``γ = 1 / sqrt(max(n, m))`` (AdamW then works at lr 1e-3 and 3e-3), or ``"peft"``, peft's
            ``γ = 1 / max(n, m)`` (AdamW at 1e-3; 3e-3 only for runs of about 100 steps).
        dropout: dropout probability on the adapter's input, in ``[0, 1)``.
        seed: seed of the shared bases.
        bases: ``"dense"``, ``"sparse"`` or ``"very_sparse"`` (ternary bases).
        recipe: ``"portable"`` (bit-identical everywhere) or ``"peft"`` (bit-exact with peft's bases).
        bias: ``"none"``, ``"all"`` (train every bias) or ``"randlora_only"`` (the adapted layers' biases).
        layers: keep only targets inside these block indices (the first integer in a module's name).
        exclude: names or a regular expression of targets to leave out.
        name: the adapter's name (default ``"default"``). On a model that already has an adapter,
            ``name=`` adds a further one on (some of) the same layers, sharing the bank (same ``seed``,
            ``recipe``, ``bases``, ``r``, ``bias``); :func:`use` activates it.

    Returns:
        An :class:`InjectReport`: the adapted layers, their shapes and the trainable count.

    Raises:
        TargetError: targets select nothing, non-linear modules, tied weights or aliased modules; neither
            ``targets`` nor ``target_parameters`` given; target_parameters select nothing, a tensor that is not
            2-D/3-D floating point, a tied one, or a weight of a layer ``targets`` also selects.
        ConfigError: ``dropout`` with ``target_parameters``; a bad setting (``r``, ``alpha``, ``init``, ``dropout``, ``seed``, ``bases``, ``recipe``, ``bias``,
            ``name``), non-floating-point weights, or layers on several devices.
        StateError: the model already has an adapter (and no ``name`` was given) or is merged.
    """
    _check_module(model)
    model = compiled_inner(model)
    cfg = _validated_config(r, alpha, dropout, seed, bases, recipe, bias, init)
    new = adapt(model, targets, cfg, layers=layers, exclude=exclude, name=name, target_parameters=target_parameters)
    return _report(model, new.items(), require_bank(model))


def adapt(model: nn.Module, targets: str | Sequence[str] | None, cfg: AdapterConfig, *, layers=None, exclude=None,
          name: str | None = None, target_parameters=None) -> dict[str, RandLoraLinear | RandLoraParameter]:
    """:func:`inject` with the settings of ``cfg`` (its ``targets``, ``fan_in_fan_out`` and ``target_parameters``
    are recomputed from ``targets`` / ``target_parameters``), without
    the report: the adapted layers by real path. :func:`randlora.load` adds adapters through it, since the
    report's trainable count reads every adapter's parameters and would cost more with each adapter loaded.

    Raises:
        as :func:`inject`.
    """
    _check_module(model)
    model = compiled_inner(model)
    cfg = _validated_config(cfg.r, cfg.alpha, cfg.dropout, cfg.seed, cfg.bases, cfg.recipe, cfg.bias, cfg.init)
    if name is not None:
        _check_name(name)
    _refuse_inner_adapter(model)
    if name is not None and bank_of(model) is not None:
        return _add_named(model, (targets, target_parameters), name, cfg, layers, exclude)
    if bank_of(model) is not None or any(True for _ in adapted_layers(model)):
        raise StateError("the model already has a RandLora adapter; call randlora.eject(model) or "
                         "randlora.merge(model) before injecting again, or pass name='...' to add a second "
                         "adapter on the same bank")
    plan = _plan(model, targets, cfg, layers, exclude, target_parameters)
    return _apply(model, plan, cfg, DEFAULT if name is None else name)


def _refuse_inner_adapter(model: nn.Module) -> None:
    """``inject`` on a module whose submodule already holds an adapter is refused, naming where it sits."""
    found = locate(model)
    if found is not None and found[0]:
        raise StateError(f"the module at {found[0]!r} inside this model already holds a RandLora adapter (inject "
                         f"was called on it): add a named adapter there with randlora.inject(model.get_submodule("
                         f"{found[0]!r}), targets, name=...), or call randlora.eject(model) before injecting here")


def _add_named(model: nn.Module, targets, name: str, cfg: AdapterConfig, layers,
               exclude) -> dict[str, RandLoraLinear | RandLoraParameter]:
    """A further adapter ``name`` on already adapted layers / parameters (``targets``: the pair ``(targets,
    target_parameters)``), reading the model's bank."""
    bank = require_bank(model)
    reg = bank.registry
    first = next(iter(reg.adapters))  # every adapter on the bank has the same shared settings
    if name in reg.adapters:
        raise StateError(f"the model already has an adapter {name!r}; pick another name, load into it with "
                         f"randlora.load_state_dict(model, sd, name={name!r}), or randlora.eject(model) first")
    if any(l.merged for _, l in adapted_weights(model)):
        raise StateError("the model is merged; call randlora.unmerge(model) before adding an adapter")
    cfg0 = reg.adapters[first]
    diff = [f"{k}={getattr(cfg, k)!r} (adapter {first!r}: {getattr(cfg0, k)!r})"
            for k in ("seed", "recipe", "bases", "r", "bias") if getattr(cfg, k) != getattr(cfg0, k)]
    if diff:
        raise ConfigError(f"adapter {name!r} shares the model's bank, so its seed, recipe, bases, r and bias must "
                          f"equal those of adapter {first!r}; differs: {', '.join(diff)}. Pass the same values, "
                          "or eject/merge the model and inject afresh")
    names, params = _select_all(model, *targets, cfg, layers, exclude)
    plain = [n for n in names if not isinstance(target_module(model, n), RandLoraLinear)]
    plain += [p for p, owner, pname in params if experts.unit_of(owner, pname) is None]
    if plain:
        raise TargetError(f"adapter {name!r} can only go on weights adapter {first!r} adapted (it reads their "
                          f"bank), but the targets also select {plain[:5]}; narrow targets / target_parameters or exclude them")
    new = {n: model.get_submodule(n) for n in names}
    new.update({p: experts.unit_of(owner, pname) for p, owner, pname in params})
    for l in new.values():
        l.add_adapter(name, alpha=cfg.alpha, dropout=cfg.dropout, init=cfg.init)
    cfg.targets = [canonical(n) for n in names]
    cfg.fan_in_fan_out = [canonical(n) for n, l in new.items() if l.fan_in_fan_out]
    cfg.target_parameters = [canonical(p) for p, _, _ in params]
    reg.adapters[name] = cfg  # off until use(model, name)
    return new


@on_root
def use(model: nn.Module, name: str) -> None:
    """Make adapter ``name`` the active one: forward, :func:`merge`, :func:`state_dict` default to it.

    Layers that do not carry ``name`` compute their base layer only while it is active.

    Raises:
        StateError: the model has no adapter ``name``, or it is merged.
    """
    reg = registry_of(model)
    name = reg.resolve(name)
    if any(l.merged for _, l in adapted_weights(model)):
        raise StateError("the model is merged; call randlora.unmerge(model) before switching adapters")
    reg.active = name


@on_root
def adapter_names(model: nn.Module) -> list[str]:
    """The model's adapters, in the order they were added."""
    return list(registry_of(model).adapters)


@on_root
def active_adapter(model: nn.Module) -> str:
    """The name of the active adapter."""
    return registry_of(model).active


def unwrap(model: nn.Module, path: str, layer: RandLoraLinear) -> None:
    """Put the original module back at ``path`` (a real module path), holding the layer's weight and bias (an
    attention module's in_proj: the child goes, the attention module holds its weights all along)."""
    if isinstance(layer, attention.RandLoraInProj):
        attention.remove_in_proj(model.get_submodule(path.rpartition(".")[0]))
        return
    base = layer.base_layer
    base.weight = layer.weight
    if layer.bias is not None:
        base.bias = layer.bias
    _set_submodule(model, path, base)


def _restore(model: nn.Module) -> None:
    for name, layer in list(_adapted_modules(model)):
        unwrap(model, name, layer)
    for _, unit in list(parameter_units(model)):
        experts.detach(unit)
    attention.sync(model)  # torch's attention fast paths back on
    bank = require_bank(model)
    bank.detach()
    delattr(model, BANK_ATTR)
    flags = bank.registry.grad_flags
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])


@on_root
def eject(model: nn.Module) -> None:
    """Remove the adapter without merging: the original layer objects come back, weights untouched.

    Raises:
        StateError: the model has no adapter.
    """
    require_bank(model)
    for _, layer in adapted_weights(model):
        if layer.merged:
            with offload.brought_in(layer):  # (a weight accelerate offloads: written back through it)
                layer.unmerge_()
    _restore(model)


@contextlib.contextmanager
@on_root
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: adapters off inside (the model computes the base layers only)."""
    require_bank(model)
    layers = [l for _, l in adapted_weights(model)]
    before = [l.disabled for l in layers]
    for l in layers:
        l.disabled = True
    try:
        yield model
    finally:
        for l, b in zip(layers, before):
            l.disabled = b


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad (the adapter's ``λ``/``γ`` and biases per ``bias``)."""
    _check_module(model)
    return [p for p in model.parameters() if p.requires_grad]


@on_root
def summary(model: nn.Module) -> str:
    """A per-layer table (shape, bases, trainable count; for a 3-D adapted parameter one matrix's shape and its
    ``E``), totals and the percentage of the model; inside :func:`randlora.cached`, what its kept tensors hold."""
    bank = require_bank(model)
    layers = list(adapted_weights(model))
    text = repr(_report(model, layers, bank))
    caches = [c for _, l in layers if (c := getattr(l, "cache", None)) is not None]
    if caches:
        mode = "W + s·ΔW" if caches[0].frozen_base else "s·ΔW"
        text += (f"\nrandlora.cached: {len(caches)} layers keep {mode}, {sum(c.nbytes for c in caches) / 2**20:.1f} MiB "
                 f"held now ({sum(c.entry is not None for c in caches)} built)")
    return text
