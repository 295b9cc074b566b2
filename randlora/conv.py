"""Adapted convolutions: RandLora on an ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` kernel.

The kernel ``W`` ``(O, I/groups, k₁, …)`` is read as the ``O × (I/groups · ∏k)`` matrix ``W.reshape(O, -1)``
(``out_features`` × ``in_features`` of the layer), adapted like a linear layer's weight
(``n = ceil(min(O, I/groups·∏k) / r)``, ``λ`` ``(r, n)``, ``γ`` ``(n, m)``), and the layer computes
``conv(x, W + s·ΔW)`` reshaped back to the kernel, with the base layer's own ``stride``, ``padding``,
``padding_mode``, ``dilation`` and ``groups`` (its ``_conv_forward``). ``groups > 1`` needs nothing more: each
group's slice of the matrix is a slice of ``W + s·ΔW`` (a depthwise ``3 × 3`` conv is an ``O × 9`` matrix).
With input dropout in training the update is its own conv: ``conv(x, W) + conv(dropout(x), s·ΔW)`` (no bias).

The kernel Parameter (and the bias) are re-registered on :class:`RandLoraConv` under their own names, so the
model's ``state_dict`` keys do not change; merge folds ``s·ΔW`` into the kernel (float32 accumulation),
``eject`` / ``merge`` put the original conv module back.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .errors import StateError
from .layer import RandLoraLinear
from .ops import acc_dtype

__all__ = ["RandLoraConv", "CONVS", "is_conv", "kernel_matrix_shape", "lora_misfit"]

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_conv(mod: nn.Module) -> bool:
    """Whether ``mod`` is an ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (subclasses included, not the
    transposed convolutions, whose kernel is stored ``(I, O/groups, …)``)."""
    return isinstance(mod, CONVS)


def kernel_matrix_shape(W: torch.Tensor) -> tuple[int, int]:
    """``(O, I/groups · ∏k)``: the matrix a kernel ``(O, I/groups, k₁, …)`` is adapted as."""
    return int(W.shape[0]), int(math.prod(W.shape[1:]))


def lora_misfit(conv: nn.Module) -> str | None:
    """Why peft's LoRA cannot hold an update of ``conv``'s kernel as its ``lora_A`` (a conv of the base's kernel
    size, stride and padding, no dilation, zero padding, all input channels) and ``lora_B`` (a ``1 × 1`` conv), or
    None when it can (``groups == 1``, ``dilation == 1``, ``padding_mode == "zeros"``)."""
    why = [f"groups={conv.groups}" if conv.groups != 1 else "",
           f"dilation={tuple(conv.dilation)}" if any(d != 1 for d in conv.dilation) else "",
           f"padding_mode={conv.padding_mode!r}" if conv.padding_mode != "zeros" else ""]
    return ", ".join(w for w in why if w) or None


class _Matrix:
    """What :class:`RandLoraLinear` reads of a base layer: a weight of the matrix's shape (an expanded scalar:
    no memory) and the bias."""

    def __init__(self, conv: nn.Module) -> None:
        O, I = kernel_matrix_shape(conv.weight)
        self.weight = nn.Parameter(conv.weight.detach().new_zeros(()).expand(O, I), requires_grad=False)
        self.bias = conv.bias


class RandLoraConv(RandLoraLinear):
    """A frozen ``nn.Conv1d`` / ``Conv2d`` / ``Conv3d`` plus a RandLora update of its kernel matrix (module
    docstring). ``out_features`` / ``in_features`` are the matrix's ``O`` and ``I/groups · ∏k``; ``weight`` is
    the conv's kernel Parameter (its shape and key unchanged).

    Args:
        base: the convolution to adapt.
        bank: the model's bank, sized for this layer's matrix.
        **kw: as :class:`RandLoraLinear` (``r``, ``alpha``, ``dropout``, ``init``, ``name``).
    """

    def __init__(self, base: nn.Module, bank, **kw) -> None:
        super().__init__(_Matrix(base), bank, **kw)
        self._parameters["weight"] = base.weight  # the kernel, in the slot (and key order) the matrix held
        object.__setattr__(self, "_base", base)

    @property
    def kind(self) -> str:
        """``Conv2d 3x3`` (``/g<groups>`` when grouped): what the report and ``summary`` show."""
        b = self._base
        return f"{type(b).__name__} {'x'.join(map(str, b.kernel_size))}" + (f"/g{b.groups}" if b.groups > 1 else "")

    def weight_matrix(self) -> torch.Tensor:
        """The kernel as its ``(O, I/groups·∏k)`` matrix: a view (so merging writes the kernel), or while
        :meth:`merge_` runs on a non-contiguous kernel (``channels_last``), the copy it writes back."""
        held = self.__dict__.get("_randlora_matrix")
        return held if held is not None else self.weight.reshape(self.out_features, self.in_features)

    def _conv(self, x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The base layer's convolution of ``x`` with ``W`` (any shape holding the kernel's values)."""
        return self._base._conv_forward(x, W.reshape(self.weight.shape), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``conv(x, W + s·ΔW) + b`` for the active adapter (:meth:`apply_adapter`).

        Raises:
            StateError: inside ``randlora.mixed`` (rows of one batch cannot share a kernel per adapter here).
        """
        if getattr(self.bank, "mixed_block", None) is not None:
            raise StateError("randlora.mixed cannot give the rows of one batch their own adapters on a convolution "
                             f"layer ({self.kind}): it serves linear layers only. Run each adapter's rows as a batch "
                             "of their own (randlora.use(model, name))")
        if self.merged and self.disabled:  # the base layer: take the merged update out
            W, acc = self.weight_matrix(), acc_dtype(self.weight.dtype)
            return self._conv(x, (W.to(acc) - self.delta_weight(acc, self.merged_name)).to(W.dtype), self.bias)
        return self.apply_adapter(x, None if (self.disabled or self.merged) else self.adapter())

    def apply_adapter(self, x: torch.Tensor, ad) -> torch.Tensor:
        """``conv(x, W + s·ΔW) + b`` for the adapter ``ad`` (None: the base conv alone); with input dropout in
        training, ``conv(x, W) + b + conv(dropout(x), s·ΔW)``."""
        if ad is None:
            return self._conv(x, self.weight, self.bias)
        if self.training and ad.drops:
            name = next(k for k, a in self.adapters().items() if a is ad)
            delta = self.delta_weight(acc_dtype(self.weight.dtype), name).to(self.weight.dtype)
            return self._conv(x, self.weight, self.bias) + self._conv(ad.dropout(x), delta, None)
        return self._conv(x, self.adapted_weight(ad), self.bias)

    @contextlib.contextmanager
    def _writable(self):
        """Inside, :meth:`weight_matrix` is a matrix whose writes reach the kernel (written back on exit)."""
        W = self.weight
        if W.is_contiguous():
            yield
            return
        self.__dict__["_randlora_matrix"] = M = W.reshape(self.out_features, self.in_features).clone()
        try:
            yield
            with torch.no_grad():
                W.copy_(M.view(W.shape))
        finally:
            del self.__dict__["_randlora_matrix"]

    def merge_(self, *args, **kw) -> None:
        """:meth:`RandLoraLinear.merge_` on the kernel matrix (same arguments)."""
        with self._writable():
            super().merge_(*args, **kw)

    def unmerge_(self) -> None:
        """:meth:`RandLoraLinear.unmerge_` on the kernel matrix."""
        with self._writable():
            super().unmerge_()

    def extra_repr(self) -> str:
        return f"{self.kind}, " + super().extra_repr()
