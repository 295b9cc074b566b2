"""Mixed batches: one adapter per batch row, on one model (``randlora.mixed``).

Inside ``with randlora.mixed(model, names):`` the model's bank holds the block's :class:`Mixed` state
(``bank.mixed_block``), and each adapted layer's call hands itself to :meth:`Mixed.forward`, which asks the
planner how to run it (:func:`randlora.planner.plan_mixed`, a :class:`~randlora.planner.MixedPlan`) and runs
that plan: each group of rows that share an adapter through that adapter
(:meth:`RandLoraLinear.apply_adapter`, planned like a separate batch of those rows), or one batched pass, and
rows named ``None``, or whose adapter is not on this layer, through the frozen layer alone. No attribute of any
layer is set; the block's state leaves the bank on exit, error or not.

Cost per layer call (``T_g`` tokens of group ``g``, ``nr = n·r``, ``m = min(O, I)``, ``M = max(O, I)``): each
group costs what a separate batch of its rows costs, as the planner routes it: the frozen ``T_g·O·I`` plus the
activation route ``T_g·nr·(O + I)``, or building ``W + s·ΔW_a`` (``M·nr·m``) and one matmul ``T_g·O·I``, or
(ternary bases) the sparse route; rows without an adapter cost ``T·O·I``. A no-grad call with few tokens per
group (decoding steps) instead runs the frozen layer once for the batch and every group in one pass over the
bases with per-row ``s·λ`` and ``γ`` (the bases read once instead of once per group; ternary bases through
their non-zeros, :func:`randlora.sparse.grouped_terms`; see :meth:`Mixed._batched_kind`). With ``keep_bytes``
the block also keeps ``W + s·ΔW_a`` between no-grad calls: a group's rows then cost one matmul with it
instead of the frozen one. Every cost rule is the planner's; this module computes none. See docs/serving.md.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import core
from .errors import ConfigError, StateError
from .layer import RandLoraLinear
from .ops import threads
from .paths import canonical, on_root
from .planner import MixedPlan, plan_mixed
from .sparse import grouped_terms
from .walker import registry_of, require_bank

__all__ = ["mixed", "Mixed", "Ended", "inside_mixed"]


def inside_mixed(bank) -> bool:
    """Whether the model holding ``bank`` is inside a ``randlora.mixed`` block now."""
    return isinstance(bank.mixed_block, Mixed)


def _adapted(model: nn.Module) -> list[tuple[str, RandLoraLinear]]:
    """``(path, layer)`` of every adapted layer, without walking into the layers (whose per-adapter children
    make ``named_modules`` slow with many adapters loaded)."""
    out, stack, seen = [], [("", model)], set()
    while stack:
        prefix, mod = stack.pop()
        if id(mod) in seen:  # a module registered twice is visited once, as named_modules does
            continue
        seen.add(id(mod))
        if isinstance(mod, RandLoraLinear):
            out.append((canonical(prefix), mod))
            continue
        stack.extend((f"{prefix}.{k}" if prefix else k, c) for k, c in reversed(mod._modules.items()) if c is not None)
    return out


class Mixed:
    """The state of one ``randlora.mixed`` block: row groups, kept ``W + s·ΔW`` and the layers' forward.

    Attributes:
        names: one adapter name (or None) per batch row.
        groups: adapter name -> the rows that use it (in batch order), for the adapters named.
        kept_bytes: bytes of ``W + s·ΔW`` kept so far (at most ``keep_bytes``).
    """

    def __init__(self, names: list[str | None], paths: dict[int, str], keep_bytes: int, density: float | None):
        self.names = names
        self.groups: dict[str, list[int]] = {}
        for i, nm in enumerate(names):
            if nm is not None:
                self.groups.setdefault(nm, []).append(i)
        self._index: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._gather: dict[tuple[tuple[str, ...], torch.device], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._runs = {name: _run(rows) for name, rows in self.groups.items()}
        self._plain: dict[tuple[str, ...], tuple[list[int], slice | None] | None] = {}
        self._gid: dict[tuple[tuple[str, ...], torch.device], torch.Tensor] = {}
        self._tok: dict[tuple[str, int, torch.device], torch.Tensor] = {}
        self._paths = paths
        self.keep_bytes = int(keep_bytes)
        self.kept_bytes = 0
        self._kept: dict[tuple[int, str], tuple] = {}
        self._density = density

    def rows(self, name: str, device: torch.device) -> torch.Tensor | None:
        """The rows of adapter ``name`` as an index tensor on ``device`` (None: every row)."""
        rows = self.groups[name]
        if len(rows) == len(self.names):
            return None
        key = (name, device)
        idx = self._index.get(key)
        if idx is None:
            idx = self._index[key] = torch.tensor(rows, dtype=torch.long, device=device)
        return idx

    def _check(self, layer, x: torch.Tensor) -> None:
        if layer.merged:
            raise StateError(f"the adapted layer {self._paths.get(id(layer), '?')!r} was merged inside "
                             "randlora.mixed(...); call randlora.unmerge(model) outside the block")
        if x.dim() < 2 or x.shape[0] != len(self.names):
            raise ConfigError(
                f"randlora.mixed got {len(self.names)} adapter names but the adapted layer "
                f"{self._paths.get(id(layer), '?')!r} was called with an input of shape {tuple(x.shape)} "
                f"({x.shape[0] if x.dim() else 0} rows; rows are the first dimension). Pass one name (or None) "
                "per batch row; generate() with num_beams or num_return_sequences > 1 repeats each row, so "
                "repeat its name as well")

    def plan(self, layer, x: torch.Tensor, present: dict | None = None, cd: torch.dtype | None = None) -> MixedPlan:
        """How a call of ``layer`` on ``x`` runs now: the planner's :func:`~randlora.planner.plan_mixed` of the
        call's facts (the groups present and their tokens, which of them the block holds a valid kept matrix of,
        grad mode, the compute dtype, the budget) and the layer's settings (``path``, ``mixed``).
        ``state.plan(layer, x).explain()`` says why a mixed call runs as it does (``present``, ``cd``: the
        adapters of the batch on this layer and the compute dtype, when the caller has them)."""
        if present is None:
            present = {name: ad for name in self.groups if (ad := layer.adapter(name)) is not None}
        cd = self._compute_dtype(layer, x, present) if cd is None else cd
        T = x.numel() // x.shape[-1]
        t, dev = T // len(self.names), x.device.type
        self._drop_stale(layer, present, cd)
        serving = not torch.is_grad_enabled() and not (layer.training and any(ad.drops for ad in present.values()))
        O, I = layer.out_features, layer.in_features
        nnz_A = layer.bank.sparse_index(O, I).nnz_A if self._density is not None else 0
        groups = tuple((name, len(self.groups[name]) * t, (id(layer), name) in self._kept) for name in present)
        return plan_mixed(groups=groups, T=T, O=O, I=I, n=layer.n, r=layer.r, device=dev, threads=threads(dev),
                          density=self._density, nnz_A=nnz_A, quantized=layer.quantized, path=layer.path,
                          force=layer.mixed, serving=serving, keep_bytes=self.keep_bytes, kept_bytes=self.kept_bytes,
                          itemsize=cd.itemsize)

    def _stamp(self, layer, ad, cd: torch.dtype) -> tuple:
        """What a kept matrix of ``ad`` on ``layer`` was built from: ``λ``, ``γ``, the weight (tensors and versions),
        the compute dtype and the bank's generation."""
        lam, gam, W = ad.randlora_lambda, ad.randlora_gamma, layer.weight
        return (lam._version, gam._version, W._version, lam.data_ptr(), gam.data_ptr(), W.data_ptr(), cd,
                getattr(layer.bank, "generation", 0))

    def _drop_stale(self, layer, present: dict, cd: torch.dtype) -> None:
        """Free the kept matrices of ``layer`` that no longer match what they were built from (:meth:`_stamp`)."""
        for name, ad in present.items():
            hit = self._kept.get((id(layer), name))
            if hit is not None and hit[0] != self._stamp(layer, ad, cd):
                self.kept_bytes -= hit[1].numel() * hit[1].element_size()
                del self._kept[(id(layer), name)]

    def _kept_matrix(self, layer, name: str, ad, cd: torch.dtype) -> torch.Tensor:
        """The kept matrix of adapter ``name`` on ``layer`` in ``cd`` (built now when the block holds none): ``W +
        s·ΔW`` (``s·ΔW`` on a quantized base layer, whose own forward stays the frozen term)."""
        key = (id(layer), name)
        hit = self._kept.get(key)
        if hit is not None:
            return hit[1]
        with torch.no_grad():
            D = layer.delta_weight(name=name)
            if not layer.quantized:
                D.add_(layer.weight_matrix().to(D.dtype))
            D = D.to(cd)
        self._kept[key] = (self._stamp(layer, ad, cd), D)
        self.kept_bytes += D.numel() * D.element_size()
        return D

    def _kept_rows(self, layer, xg: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
        """The layer's output for the rows ``xg`` of a group with the kept matrix ``D`` (:meth:`_kept_matrix`):
        ``x_g (W + s·ΔW)ᵀ + b``, or ``base(x_g) + x_g (s·ΔW)ᵀ`` on a quantized base layer; in the dtype the
        layer's own forward returns."""
        if layer.quantized:
            base = layer.apply_adapter(xg, None)
            with torch.autocast(xg.device.type, enabled=False):
                return base + F.linear(xg.to(D.dtype), D).to(base.dtype)
        out_dtype = core.compute_dtype(xg, layer.weight.dtype)[1]
        with torch.autocast(xg.device.type, enabled=False):
            y = F.linear(xg.to(D.dtype), D, layer.bias.to(D.dtype) if layer.bias is not None else None)
        return y if out_dtype is None else y.to(out_dtype)

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        """The layer's output for the whole batch, each row through its own adapter: the call's :meth:`plan`, run.
        ``"grouped"``: each group of rows through :meth:`RandLoraLinear.apply_adapter` on its own (planned like a
        separate batch of those rows), kept groups by one matmul each, the other rows through the frozen layer,
        then the rows put back in batch order; ``"batched"``/``"batched-sparse"``: :meth:`_base_plus_terms`."""
        self._check(layer, x)
        present = {name: ad for name in self.groups if (ad := layer.adapter(name)) is not None}
        cd = self._compute_dtype(layer, x, present)
        plan = self.plan(layer, x, present, cd)
        if plan.kind == "base":  # this layer carries none of the batch's adapters: every row keeps the base
            return layer.apply_adapter(x, None)
        if plan.kind == "plain":  # one adapter on every row: a plain call
            return layer.apply_adapter(x, next(iter(present.values())))
        kept = {name: self._kept_matrix(layer, name, present[name], cd) for name in plan.keep}
        rest = {name: ad for name, ad in present.items() if name not in kept}
        if plan.kind != "grouped":
            return self._base_plus_terms(layer, x, kept, rest, plan)
        parts = [layer.apply_adapter(self._rows_of(x, name), ad) for name, ad in rest.items()]
        parts += [self._kept_rows(layer, self._rows_of(x, name), D) for name, D in kept.items()]
        return self._reassemble(layer, x, parts, tuple(rest) + tuple(kept))

    def _reassemble(self, layer, x: torch.Tensor, parts: list, applied: tuple[str, ...]) -> torch.Tensor:
        """The batch's output from the groups' ``parts`` (in the order of ``applied``) plus the frozen layer's
        output for the other rows: concatenated when every group is one run of rows, else put back by index (one
        autograd node when recording gradients, in place otherwise)."""
        inv, others = self._inverse(applied, x.device)
        plain = self._cat_order(applied)
        if others is not None:
            parts.append(layer.apply_adapter(x[plain[1]] if plain else x.index_select(0, others), None))
        if len(parts) == 1:  # one group holds every row, in batch order
            return parts[0]
        if plain is not None:  # every group is one run of rows: concatenated in order, they are the batch
            return torch.cat([parts[k].to(parts[0].dtype) for k in plain[0]])
        if torch.is_grad_enabled():  # one autograd node puts the rows back in batch order
            return torch.cat([t.to(parts[0].dtype) for t in parts]).index_select(0, inv)
        out = parts[0].new_empty((len(self.names),) + tuple(parts[0].shape[1:]))
        for t, idx in zip(parts, [self.rows(n, x.device) for n in applied] + [others]):
            out.index_copy_(0, idx, t.to(out.dtype))  # each group's rows written once, in place
        return out

    def _compute_dtype(self, layer, x: torch.Tensor, present: dict) -> torch.dtype:
        """The dtype the layer's own forward computes the adapter term in (:func:`randlora.core.compute_dtype`)."""
        if layer.quantized:
            base = x.dtype if x.is_floating_point() else next(iter(present.values())).randlora_lambda.dtype
        else:
            base = layer.weight.dtype
        return core.compute_dtype(x, base)[0]

    def _base_plus_terms(self, layer, x: torch.Tensor, kept: dict, rest: dict, plan: MixedPlan) -> torch.Tensor:
        """The frozen layer once for the batch plus one batched pass for ``rest`` (``plan.kind``); then the kept
        groups' rows replaced by theirs (:meth:`_kept_rows`)."""
        out = layer.apply_adapter(x, None)
        with torch.autocast(x.device.type, enabled=False):
            cd = self._compute_dtype(layer, x, rest)  # (with autocast off: the pass in the weight's dtype)
            if plan.kind == "batched-sparse":
                wd = torch.float32 if plan.work_float32 else cd
                term = self._sparse_batched(layer, x.to(cd), list(rest.items()), plan, wd)
            else:
                term = self._batched(layer, x.to(torch.float32 if plan.work_float32 else cd), list(rest.items()))
            out = out + term.to(out.dtype)
        for name, D in kept.items():
            rows = self._kept_rows(layer, self._rows_of(x, name), D).to(out.dtype)
            out.index_copy_(0, self.rows(name, x.device), rows)
        return out

    def _rows_of(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The rows of adapter ``name``: a view when they are one run of rows, else gathered."""
        run = self._runs[name]
        return x[run] if run is not None else x.index_select(0, self.rows(name, x.device))

    def _tokens(self, name: str, t: int, device: torch.device) -> torch.Tensor:
        """The token positions (rows of the ``(B·t, I)`` input) of adapter ``name``'s rows."""
        key = (name, t, device)
        tok = self._tok.get(key)
        if tok is None:
            rows = torch.tensor(self.groups[name], dtype=torch.long, device=device)
            tok = self._tok[key] = (rows[:, None] * t + torch.arange(t, device=device)).reshape(-1)
        return tok

    def _batched(self, layer, x: torch.Tensor, rest: list) -> torch.Tensor:
        """Every adapter of ``rest`` in one pass over the bases, each row with its own ``s·λ`` and ``γ`` (zeros
        for rows of other adapters): ``ΔW = Σ_i B_i diag(λ_i) A diag(γ_i)`` applied as
        ``x diag(γ_i) Aᵀ diag(λ_i) B_iᵀ`` (``I <= O``) or ``x B_i diag(λ_i) A diag(γ_i)`` (``O < I``)."""
        cd, rows = x.dtype, x.shape[0]
        key = (tuple(nm for nm, _ in rest), x.device)
        gid = self._gid.get(key)
        if gid is None:
            slot = {nm: k for k, (nm, _) in enumerate(rest)}
            gid = self._gid[key] = torch.tensor([slot.get(nm, len(rest)) for nm in self.names], dtype=torch.long,
                                                device=x.device)
        lam0, gam0 = rest[0][1].randlora_lambda, rest[0][1].randlora_gamma
        lam_st = torch.stack([ad.randlora_lambda.to(cd) * ad.scaling for _, ad in rest]
                             + [lam0.new_zeros(lam0.shape, dtype=cd)])
        gam_st = torch.stack([ad.randlora_gamma.to(cd) for _, ad in rest] + [gam0.new_zeros(gam0.shape, dtype=cd)])
        lr, gr = lam_st.index_select(0, gid), gam_st.index_select(0, gid)  # (B, r, n), (B, n, m)
        A, Bf = layer.views()
        A, Bf = A.to(cd), Bf.to(cd)  # (r, m), (M, n·r) with column k·n + i for basis i, rank k
        r, n = lr.shape[1], lr.shape[2]
        xf = x.reshape(rows, -1, x.shape[-1])  # (B, t, I)
        t = xf.shape[1]
        if layer.out_features >= layer.in_features:
            u = torch.matmul(xf[:, :, None, :] * gr[:, None], A.t())  # (B, t, n, r)
            z = (u.transpose(-1, -2) * lr[:, None]).reshape(rows, t, r * n)
            y = torch.matmul(z, Bf.t())  # (B, t, O)
        else:
            z = torch.matmul(xf, Bf).reshape(rows, t, r, n) * lr[:, None]
            y = (torch.matmul(z.transpose(-1, -2), A) * gr[:, None]).sum(-2)  # (B, t, n, m) -> (B, t, O)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _sparse_batched(self, layer, x: torch.Tensor, rest: list, plan: MixedPlan, wd: torch.dtype) -> torch.Tensor:
        """Every adapter of ``rest`` in one pass over ternary bases' non-zeros (:func:`randlora.sparse.grouped_terms`:
        the ``B_flat`` product once for all rows, the ``S`` product per adapter on its rows' tokens), in the plan's
        token windows and sides, summed in ``wd``."""
        xf = x.reshape(-1, x.shape[-1])
        t = xf.shape[0] // len(self.names)
        groups = [(ad.randlora_lambda, ad.randlora_gamma, ad.scaling, self._tokens(nm, t, x.device)) for nm, ad in rest]
        idx = layer.bank.sparse_index(layer.out_features, layer.in_features)
        return grouped_terms(xf, idx, layer.out_features, groups, plan.block, plan.scaled_below,
                             wd).reshape(*x.shape[:-1], -1)

    def _inverse(self, applied: tuple[str, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The gather index that maps the groups ``applied`` (concatenated, then the other rows in batch order) to
        batch order, and the index of those other rows (None when there are none)."""
        key = (applied, device)
        hit = self._gather.get(key)
        if hit is None:
            taken = [i for n in applied for i in self.groups[n]]
            others = sorted(set(range(len(self.names))) - set(taken))
            inv = torch.empty(len(self.names), dtype=torch.long)
            inv[torch.tensor(taken + others, dtype=torch.long)] = torch.arange(len(self.names))
            hit = self._gather[key] = (inv.to(device), torch.tensor(others, dtype=torch.long, device=device)
                                       if others else None)
        return hit

    def _cat_order(self, applied: tuple[str, ...]) -> tuple[list[int], slice | None] | None:
        """When the rows of each group of ``applied``, and the other rows, are runs of consecutive rows (a batch
        sorted by adapter): the order of their parts that concatenates to batch order, and the other rows' run;
        else None (the parts are put back by index)."""
        if applied not in self._plain:
            taken = {i for n in applied for i in self.groups[n]}
            others = [i for i in range(len(self.names)) if i not in taken]
            runs = [self._runs[n] for n in applied] + ([_run(others)] if others else [])
            self._plain[applied] = None if any(r is None for r in runs) else (
                sorted(range(len(runs)), key=lambda k: runs[k].start), runs[-1] if others else None)
        return self._plain[applied]


def _run(rows: list[int]) -> slice | None:
    """``rows`` as a slice when they are consecutive, else None."""
    return slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else None


class Ended:
    """A model's ``bank.mixed_block`` from the end of a ``mixed`` block until each of its adapted layers' next call.
    A call from inside a backward pass is activation checkpointing re-running, outside the block, a forward that
    ran inside it (reentrant checkpointing runs that forward without gradients, so any call of the block may be
    one): every row would take the active adapter and the gradients would be wrong, so it is refused. Any other
    call is a new forward: the layer runs as usual and is no longer watched; the last one clears the marker."""

    def __init__(self, bank, paths: dict[int, str]) -> None:
        self.bank, self.pending = bank, paths

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        path = self.pending.get(id(layer))
        if path is not None and getattr(torch._C, "_current_graph_task_id", lambda: -1)() != -1:
            raise StateError(
                f"the adapted layer {path!r} is being re-run during backward after a randlora.mixed(...) block "
                "ended: activation checkpointing recomputes the forward in backward, and a forward that ran inside "
                "the block must be recomputed inside it (outside, every row would take the active adapter: wrong "
                "gradients). Call loss.backward() inside the `with randlora.mixed(...)` block")
        self.pending.pop(id(layer), None)
        if not self.pending and self.bank.mixed_block is self:
            self.bank.mixed_block = None
        return layer.own_forward(x)


@contextlib.contextmanager
@on_root
def mixed(model: nn.Module, names: Sequence[str | None], *, keep_bytes: int = 0) -> Iterator[Mixed]:
    """Context manager: inside, batch row ``i`` runs through adapter ``names[i]`` (``None``: the base model).

    Every adapted layer computes each group of rows sharing an adapter as a batch of its own through that
    adapter (``x_g Wᵀ + b + s · dropout(x_g) ΔWᵀ``, planned like any call), and the rows of ``None`` through the
    frozen layer; decode-sized no-grad calls run the frozen layer once for the whole batch plus one pass over the
    bases for every group. A layer that lacks an adapter leaves its rows at the base.
    Rows are the inputs' first dimension (``(B, ..., I)``), so it works for a plain forward, for training
    (each row's gradient reaches its own adapter only) and under transformers' ``generate()`` with a KV cache.
    Each row's output equals that row run alone with its adapter active (:func:`randlora.use`).

    Args:
        model: an adapted model (or any module containing its root), not merged.
        names: one adapter name or None per batch row (a list or tuple).
        keep_bytes: memory budget for keeping each used adapter's ``W + s·ΔW`` (``O × I`` per layer and adapter,
            in the compute dtype; ``s·ΔW`` on quantized base layers) between the block's no-grad calls, where its
            matmul beats the call's route (a call that goes group by group; a decode-sized call only when keeping
            every group beats the batched pass: :func:`randlora.planner.plan_mixed`; docs/serving.md); 0 (default)
            keeps nothing.

    Yields:
        the block's :class:`Mixed` state (``groups``, ``kept_bytes``).

    Raises:
        ConfigError: ``names`` is not a non-empty list/tuple of str or None, ``keep_bytes`` is negative, or (at
            the first adapted layer's call) the batch has another number of rows than ``names``.
        StateError: the model has no adapter, a name is not one of its adapters, it is merged, or it is
            already inside ``randlora.mixed``.
    """
    reg = registry_of(model)
    if isinstance(names, (str, bytes)) or not isinstance(names, (list, tuple)):
        raise ConfigError(f"names must be a list or tuple with one adapter name (or None) per batch row, got "
                          f"{type(names).__name__}: {names!r:.80}")
    names = list(names)
    if not names:
        raise ConfigError("names is empty; pass one adapter name (or None) per batch row")
    bad = sorted({repr(n) for n in names if n is not None and not isinstance(n, str)})
    if bad:
        raise ConfigError(f"names must be adapter names (str) or None, got {', '.join(bad[:5])}")
    unknown = list(dict.fromkeys(n for n in names if n is not None and n not in reg.adapters))
    if unknown:
        raise StateError(f"the model has no adapter {unknown[0]!r}" + (f" (nor {unknown[1:5]})" if unknown[1:] else "")
                         + f"; its adapters are {list(reg.adapters)}. Load one with randlora.load(model, path, "
                         f"name={unknown[0]!r}), or use None for the base model")
    if isinstance(keep_bytes, bool) or not isinstance(keep_bytes, int) or keep_bytes < 0:
        raise ConfigError(f"keep_bytes must be a non-negative int (bytes), got {keep_bytes!r}")
    layers = _adapted(model)
    merged = [p for p, l in layers if l.merged]
    if merged:
        raise StateError(f"the model is merged (layers such as {merged[0]!r} hold an adapter in their weights), so "
                         "per-row adapters would add to it; call randlora.unmerge(model) first")
    bank = layers[0][1].bank if layers else require_bank(model)  # (only adapted parameters: they refuse rows)
    if bank is not None and inside_mixed(bank):
        raise StateError("the model is already inside randlora.mixed(...); leave that block first (one block per "
                         "model at a time)")
    paths = {id(l): p for p, l in layers}
    state = Mixed(names, paths, keep_bytes, core.density(bank) if bank is not None else None)
    try:
        if bank is not None:
            bank.mixed_block = state
        yield state
    finally:
        if bank is not None:  # until its next call, a layer refuses to be re-run by backward (checkpointing)
            bank.mixed_block = Ended(bank, dict(paths)) if paths else None
        state._kept.clear()
