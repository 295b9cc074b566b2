"""Models dispatched by accelerate (``from_pretrained(device_map=...)``, ``dispatch_model``, ``cpu_offload``,
``disk_offload``): layers on several devices, and layers whose weights accelerate keeps off the device (in CPU
memory or on disk) and brings in for each forward, leaving the parameters on the ``meta`` device in between.

accelerate does this with a hook on each layer (``_hf_hook``, an ``AlignDevicesHook``) that wraps the layer's
``forward``; :func:`randlora.inject` replaces a target layer by a :class:`~randlora.layer.RandLoraLinear`, whose
forward that hook no longer wraps. This module carries the hook's job over to the adapted layer:

* the layer computes on the hook's *execution device* (:func:`compute_device`), where its ``λ``/``γ`` are made;
* an offloaded layer's ``weight``/``bias`` are brought in from the hook's ``weights_map`` for the call and sent
  back to ``meta`` after it (:class:`Onload`); a tensor the call saves for backward that is the brought-in weight
  (or a view of it) is not kept: backward fetches it again (``torch.autograd.graph.saved_tensors_hooks``), so no
  brought-in copy of a frozen weight outlives the layer's forward;
* the shared bases stay one bank on the model's root (its fingerprint and recipe unchanged); a layer computing on
  another device reads a copy of them made once per device, on first use, and remade when the bank changes
  (:func:`bank_copy`).

* :func:`randlora.merge` / ``unmerge`` / ``eject`` fold into an offloaded layer's weight by bringing a copy in
  (:func:`brought_in`), folding it as for any layer (float32 accumulation) and writing it back where accelerate
  keeps it: its CPU-memory copy, or a file of its offload folder; a weight accelerate reads from the checkpoint's
  own file is written to the offload folder instead (the checkpoint is never written), and without one the merge
  is refused before any weight changes (:func:`check_merge`), naming ``python -m randlora merge``.

What else is refused (:func:`bank_device`): training biases (``bias=`` other than ``"none"``) or adapting
parameters (``target_parameters``), attention ``in_proj`` weights or quantised layers where accelerate offloads
them (the hook would put the stored values back at each call), ternary bases across several devices (their
sparse index is the bank's), and a hook that offloads a whole block at once above a target.
"""

from __future__ import annotations

import contextlib
import weakref
from contextlib import nullcontext

import torch
from torch import nn

from .errors import ConfigError, StateError
from .paths import examples

__all__ = ["align_hook", "compute_device", "bank_device", "place", "bank_copy", "check_merge", "brought_in",
           "offloaded", "Onload"]

_NAMES = ("weight", "bias")


def align_hook(mod: nn.Module):
    """The ``AlignDevicesHook`` accelerate attached to ``mod`` (inside a ``SequentialHook`` too), or None; for an
    attention module's in_proj (:class:`randlora.attention.InProj`), the attention module's."""
    hook = getattr(getattr(mod, "mha", mod), "_hf_hook", None)
    if hook is None:
        return None
    from accelerate.hooks import AlignDevicesHook

    found = [h for h in getattr(hook, "hooks", (hook,)) if isinstance(h, AlignDevicesHook)]
    return found[0] if found else None


def _device(d) -> torch.device:
    """A hook's execution device as a ``torch.device`` (accelerate writes an accelerator index as an int)."""
    if isinstance(d, int):
        acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
        return torch.device(acc.type if acc is not None else "cuda", d)
    return torch.device(d)


def compute_device(mod: nn.Module) -> torch.device:
    """The device ``mod`` computes on: its accelerate hook's execution device, else its weight's device."""
    hook = align_hook(mod)
    if hook is not None and hook.execution_device is not None:
        return _device(hook.execution_device)
    return mod.weight.device


def offloaded(mod: nn.Module) -> bool:
    """Whether accelerate keeps ``mod``'s own weights off the device between its calls."""
    hook = align_hook(mod)
    return hook is not None and bool(hook.offload)


def bank_device(model: nn.Module, mods: dict[str, nn.Module], devices: set, cfg, params: list) -> torch.device:
    """The device of the bank :func:`randlora.inject` makes for the target layers ``mods`` (computing on
    ``devices``), after checking that a dispatched model can take the adapter as asked.

    Returns:
        The one device, or on a model dispatched over several devices the first target's compute device.

    Raises:
        ConfigError: targets on several devices in a model accelerate did not dispatch; ternary bases across
            several devices; trained biases, adapted parameters or an attention ``in_proj`` where accelerate
            offloads the weights; a hook offloading a whole block above a target.
    """
    hooked = [n for n, m in mods.items() if align_hook(m) is not None]
    if len(devices) > 1 and not hooked:
        raise ConfigError(f"target layers sit on several devices {sorted(map(str, devices))}; move the model to "
                          "one device before injecting, or dispatch it with accelerate (from_pretrained(..., "
                          "device_map=...), dispatch_model), whose layers may sit on several devices")
    if len(devices) > 1 and cfg.bases != "dense":
        raise ConfigError(f"bases={cfg.bases!r} on a model computing on several devices "
                          f"{sorted(map(str, devices))}: the ternary bases' sparse index is built on one device. "
                          "Pass bases='dense', or put the adapted layers on one device")
    _refuse_offloaded(model, mods, cfg, params)
    return compute_device(next(iter(mods.values()))) if len(devices) > 1 else next(iter(devices))


def _refuse_offloaded(model: nn.Module, mods: dict[str, nn.Module], cfg, params: list) -> None:
    """What an offloaded model cannot take (see :func:`bank_device`)."""
    from .quantized import is_quantized

    if not any(hasattr(m, "_hf_hook") for m in model.modules()):
        return  # (not dispatched)
    off = [n for n, m in mods.items() if offloaded(m)]
    whole = [n for n, m in model.named_modules() if offloaded(m) and align_hook(m).place_submodules
             and any(t == n or t.startswith(n + ".") for t in mods)]
    odd = [n for n in off if hasattr(mods[n], "mha") or is_quantized(mods[n])]
    biases = ([n for n, m in model.named_modules() if offloaded(m) and getattr(m, "bias", None) is not None]
              if cfg.bias == "all" else [n for n in off if mods[n].bias is not None] if cfg.bias != "none" else [])
    owners = [p for p, o, _ in params if offloaded(o)]
    keep = "load the model with a device_map / max_memory that keeps them on a device"
    why = [(whole, f"accelerate offloads a whole block at once above the targets ({examples(whole)}), and its hook "
                   "would swap the adapter's λ/γ too; nothing was changed. Dispatch with a device_map of smaller "
                   "blocks (from_pretrained's own maps hook each layer)"),
           (odd, f"the targets {examples(odd)} are offloaded attention in_proj weights or quantised layers, whose "
                 f"weights the adapted layer does not hold itself; nothing was changed. Exclude them, or {keep}"),
           (biases, f"bias={cfg.bias!r} trains biases accelerate offloads ({examples(biases)}): its hook puts the "
                    "stored values back at each call, so the training would be lost; nothing was changed. Pass "
                    f"bias='none', or {keep}"),
           (owners, f"target_parameters {examples(owners)} are offloaded by accelerate, whose hook puts the stored "
                    f"tensors back at each call; nothing was changed. Leave them out, or {keep}")]
    for found, msg in why:
        if found:
            raise ConfigError(msg)


def place(new: dict[str, nn.Module], mods: dict[str, nn.Module], bank) -> None:
    """Carry each hooked base's accelerate hook over to its adapted layer: ``λ``/``γ`` on the compute device, and
    for an offloaded base the :class:`Onload` forward; give the bank its per-device copies when a layer computes
    elsewhere. Layers of undispatched models are left as they are."""
    for n, base in mods.items():
        hook = align_hook(base)
        if hook is None:
            continue
        layer, dev = new[n], compute_device(base)
        if layer.randlora_lambda.device != dev:
            _adapter_on(layer, dev)
        if not hasattr(mods[n], "mha"):  # (an in_proj's attention module keeps its own hook and forward)
            layer.forward = Onload(layer, hook, dev)
        if bank.A.device != dev and not hasattr(bank, "_device_copies"):
            bank._device_copies = {}


def _adapter_on(layer: nn.Module, dev: torch.device) -> None:
    """Make the layer's adapter ``λ``/``γ`` afresh on ``dev`` (they were made on the meta device beside an
    offloaded weight) and write their start."""
    for name in ("randlora_lambda", "randlora_gamma"):
        p = getattr(layer, name)
        setattr(layer, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=dev),
                                          requires_grad=p.requires_grad))
    layer.reset_parameters()


def bank_copy(bank, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The bank's ``(A, B)`` on ``device`` for a dispatched model's layers computing there (copied once per
    device, again when the bank changes); None for a model accelerate did not dispatch."""
    copies = getattr(bank, "_device_copies", None)
    if copies is None:
        return None
    A, B = bank.A, bank.B
    stamp = (bank.generation, A.dtype, A.data_ptr(), B.data_ptr(), A._version, B._version)
    hit = copies.get(device)
    if hit is None or hit[0] != stamp:
        hit = copies[device] = (stamp, A.to(device), B.to(device))
    return hit[1], hit[2]


def _onload(layer: nn.Module) -> Onload | None:
    """The :class:`Onload` of a layer whose weights accelerate offloads, else None."""
    f = layer.__dict__.get("forward")
    return f if isinstance(f, Onload) and f.names else None


def _storage(hook, name: str):
    """``(mapping, key)``: where accelerate keeps the hooked module's tensor ``name``."""
    from accelerate.utils.offload import PrefixedDataset

    wm = hook.weights_map
    return (wm.dataset, wm.prefix + name) if isinstance(wm, PrefixedDataset) else (wm, name)


def _unwritable(hook) -> str | None:
    """Why a merged weight cannot be written back where accelerate keeps the weight (None: it can)."""
    from accelerate.utils.offload import OffloadedWeightsLoader

    ds, key = _storage(hook, "weight")
    if isinstance(ds, OffloadedWeightsLoader):
        return None if key in ds.state_dict or ds.save_folder is not None else (
            "read from the checkpoint's own files, and accelerate has no offload folder to write a merged copy to")
    return None if isinstance(ds, dict) else f"kept in a {type(ds).__name__}, which this library cannot write"


def _store(hook, value: torch.Tensor) -> None:
    """Write the merged ``weight`` back where accelerate keeps it: its CPU-memory copy, or a ``.dat`` file of
    accelerate's offload folder (a weight read from the checkpoint's own file gets one there: the checkpoint is
    never written)."""
    from accelerate.utils.offload import OffloadedWeightsLoader, offload_weight

    ds, key = _storage(hook, "weight")
    if isinstance(ds, OffloadedWeightsLoader) and key not in ds.state_dict:
        offload_weight(value, key, ds.save_folder, ds.index)
        return
    held = ds.state_dict if isinstance(ds, OffloadedWeightsLoader) else ds
    held[key] = value.to(held[key].device)


def check_merge(layers: list) -> None:
    """Refuse, before any weight changes, a merge of offloaded layers whose weight cannot be written back.

    Raises:
        StateError: some of ``layers`` (``(path, layer)`` pairs) keep their weight where it cannot be written.
    """
    bad = [(n, why) for n, l in layers if _onload(l) is not None and (why := _unwritable(_onload(l).hook))]
    if bad:
        raise StateError(
            f"the weights of {len(bad)} adapted layers ({examples([n for n, _ in bad])}) are offloaded by accelerate "
            f"and {bad[0][1]}; nothing was merged. Merge into the checkpoint instead: randlora.save(model, "
            "'adapter.safetensors'), then python -m randlora merge --base <model folder> --adapter "
            "adapter.safetensors --out <merged folder> (shard by shard); or load the model with an offload_folder")


@contextlib.contextmanager
def brought_in(layer: nn.Module, write: bool = True):
    """For a layer whose weights accelerate offloads: inside, its ``weight``/``bias`` on the execution device
    (a copy of the stored ones), so that ``merge_``/``unmerge_`` fold into a real tensor; on leaving without an
    error and with ``write``, the weight is written back through accelerate's offload (:func:`_store`); either
    way the parameters go back to the meta device. Any other layer: nothing happens."""
    on = _onload(layer)
    if on is None:
        yield
        return
    on.bring_in(layer, copy=True)
    try:
        yield
        if write:
            _store(on.hook, layer.weight.detach())
    finally:
        on.send_back(layer)


class Onload:
    """The forward of an adapted layer whose base accelerate hooked: the input on the hook's execution device (and
    the output back on the input's where the hook says so); where the hook offloads, ``weight``/``bias`` brought in
    from its ``weights_map`` for the call (tensors the call saves for backward that are the brought-in weight are
    fetched again in backward instead of kept) and sent back to ``meta`` after it. Installed as the layer's
    ``forward`` attribute by :func:`place`; the base keeps its own hook untouched."""

    def __init__(self, layer: nn.Module, hook, device: torch.device) -> None:
        self.layer = weakref.ref(layer)
        self.hook, self.device = hook, device
        self.names = [n for n in _NAMES if hook.offload and layer._parameters.get(n) is not None]
        self._live: dict[str, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        layer, src = self.layer(), x.device
        self.bring_in(layer)
        self._live = {n: layer._parameters[n] for n in self.names}
        keep = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        try:
            with keep if self.names and torch.is_grad_enabled() else nullcontext():
                y = type(layer).forward(layer, x.to(self.device), *args, **kwargs)
        finally:
            self._live = {}
            self.send_back(layer)
        return y.to(src) if self.hook.io_same_device else y

    def bring_in(self, layer: nn.Module, copy: bool = False) -> None:
        """Put the stored ``weight``/``bias`` on the execution device into ``layer`` (``copy``: never the stored
        tensor itself, for a caller that writes into it)."""
        from accelerate.utils import set_module_tensor_to_device

        for n in self.names:
            v = self.hook.weights_map[n]
            set_module_tensor_to_device(layer, n, self.device, value=v.clone() if copy else v)

    def send_back(self, layer: nn.Module) -> None:
        """``layer``'s ``weight``/``bias`` back on the meta device."""
        from accelerate.utils import set_module_tensor_to_device

        for n in self.names:
            set_module_tensor_to_device(layer, n, "meta")

    def _pack(self, t: torch.Tensor):
        for n, W in self._live.items():
            if t.device == W.device and t.untyped_storage().data_ptr() == W.untyped_storage().data_ptr():
                return (n, t.dtype, t.shape, t.stride(), t.storage_offset())
        return t

    def _unpack(self, saved):
        if isinstance(saved, torch.Tensor):
            return saved
        n, dtype, shape, stride, offset = saved
        W = self.hook.weights_map[n].to(device=self.device, dtype=dtype)
        return W.as_strided(shape, stride, offset)
