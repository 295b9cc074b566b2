"""LoRA export of adapted parameters (``target_parameters``, :mod:`randlora.experts`) in peft's layout for them.

peft's LoRA adapts a parameter by wrapping its module in a ``ParamWrapper`` (``LoraConfig(target_parameters=...)``);
several parameters of one module nest, the first one registered innermost: its factors sit at
``<module>.base_layer.lora_A.weight``, the next one's at ``<module>.lora_A.weight`` (one ``base_layer.`` less for each
later one). A 3-D ``(E, a, b)`` tensor is ``E`` matrices with one rank ``k``: ``lora_A`` ``(E·k, in)`` (expert
``e``'s rows ``e·k … e·k + k - 1``) and ``lora_B`` ``(out, k·E)`` (expert ``e``'s columns ``e, E + e, …``), with
``(in, out) = (a, b)`` when the module says its experts are stored transposed (gpt-oss's ``is_transposed``), else
``(b, a)``; a 2-D tensor is one matrix, ``(in, out) = (b, a)``.

Each expert's ``s·ΔW_e`` is factored by :func:`randlora.export.factor` (a truncated SVD at ``rank``, or the smallest
rank keeping ``energy``); the tensor's rank is its experts' largest, the others padded with zero factors (their
product unchanged), and its error and energy are over all its experts.
"""

from __future__ import annotations

import math

import torch

from .errors import StateError

__all__ = ["peft_paths", "export_parameters"]


def peft_paths(units: list[tuple[str, object]]) -> dict[str, str]:
    """``{parameter path: the module path peft holds its factors under}`` (``base_layer.`` nesting, see above)."""
    out = {}
    for path, unit in units:
        owner = path.rpartition(".")[0]
        order = [k for k, p in unit.owner._parameters.items() if p is not None]
        later = [k for k in order[order.index(unit.param) + 1:] if f"{owner}.{k}" in dict(units)]
        out[path] = ".".join(p for p in (owner, *["base_layer"] * len(later)) if p)
    return out


def _expert_factors(D: torch.Tensor, transposed: bool, *, rank, energy, method, dtype):
    """Every expert's factors of ``D`` ``(E, a, b)`` at one rank (zero-padded): ``(A (E, k, in), B (out, k, E),
    k, error, energy kept)``."""
    from .export import factor

    facs = [factor(D[e].t() if transposed else D[e], rank=rank, energy=energy, method=method, dtype=dtype)
            for e in range(D.shape[0])]
    k = max(f[2] for f in facs)
    E, (out, inp) = D.shape[0], (facs[0][1].shape[0], facs[0][0].shape[1])
    A = torch.zeros(E, k, inp, dtype=facs[0][0].dtype)
    B = torch.zeros(out, k, E, dtype=facs[0][1].dtype)
    norms = torch.linalg.matrix_norm(D.double()) ** 2  # per expert
    lost = kept = 0.0
    for e, (Ae, Be, ke, err, kp) in enumerate(facs):
        A[e, :ke], B[:, :ke, e] = Ae, Be
        lost, kept = lost + (err * err * float(norms[e]) if norms[e] > 0 else 0.0), kept + kp * float(norms[e])
    total = float(norms.sum())
    error = math.sqrt(lost / total) if total > 0 else max(f[3] for f in facs)
    return A, B, k, error, (kept / total if total > 0 else 1.0)


def export_parameters(units: list[tuple[str, object]], adapter: str, *, rank, energy, method, dtype,
                      svd_dtype: torch.dtype) -> dict:
    """:class:`randlora.export.LoraLayer` s of adapted parameters, keyed by the module path peft holds them under.

    Args:
        units: ``(parameter path, RandLoraParameter)`` carrying ``adapter``.
        adapter: the adapter to export.
        rank, energy, method, dtype: as :func:`randlora.to_lora` (``dtype`` None: the parameter's).
        svd_dtype: the dtype ``s·ΔW`` is built and factored in.

    Returns:
        ``{peft module path: LoraLayer}`` (``param`` set to the parameter's path).

    Raises:
        StateError: an update is non-finite.
    """
    from .export import LoraLayer

    paths = peft_paths(units)
    layers = {}
    for path, unit in units:
        D = unit.delta_weight(svd_dtype, adapter)
        if not bool(torch.isfinite(D).all()):
            raise StateError(f"parameter {path}: its update s·ΔW holds inf/nan (λ/γ are non-finite or overflow); "
                             "nothing was exported. Reload a good adapter")
        transposed = D.dim() == 3 and bool(getattr(unit.owner, "is_transposed", False))
        A, B, k, err, kept = _expert_factors(D if D.dim() == 3 else D[None], transposed, rank=rank, energy=energy,
                                             method=method, dtype=unit.weight.dtype if dtype is None else dtype)
        layers[paths[path]] = LoraLayer(lora_A=A.reshape(-1, A.shape[2]), lora_B=B.reshape(B.shape[0], -1), rank=k,
                                        error=err, energy=kept, param=path)
    return layers
