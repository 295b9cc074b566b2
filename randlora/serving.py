"""Mixed batches: one adapter per batch row, on one model (``randlora.mixed``).

Inside ``with randlora.mixed(model, names):`` every adapted layer's ``forward`` is :meth:`Mixed.forward`:
each group of rows that share an adapter goes through that adapter (:meth:`RandLoraLinear.apply_adapter`,
planned like a separate batch of those rows), and rows named ``None``, or whose adapter is not on this layer,
through the frozen layer alone. Nothing in :mod:`randlora.layer` changes; the block undoes the override on
exit, error or not.

Cost per layer call (``T_g`` tokens of group ``g``, ``nr = n·r``, ``m = min(O, I)``, ``M = max(O, I)``): each
group costs what a separate batch of its rows costs, as the planner routes it: the frozen ``T_g·O·I`` plus the
activation route ``T_g·nr·(O + I)``, or building ``W + s·ΔW_a`` (``M·nr·m``) and one matmul ``T_g·O·I``, or
(ternary bases) the sparse route; rows without an adapter cost ``T·O·I``. A no-grad call with few tokens per
group (decoding steps) instead runs the frozen layer once for the batch and every group in one pass over the
bases with per-row ``s·λ`` and ``γ`` (the bases read once instead of once per group; ternary bases through
their non-zeros, :func:`randlora.sparse.grouped_terms`; see :meth:`Mixed._batched_kind`). With ``keep_bytes``
the block also keeps ``W + s·ΔW_a`` between no-grad calls: a group's rows then cost one matmul with it
instead of the frozen one. See
docs/serving.md.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, StateError
from .layer import RandLoraLinear
from .paths import canonical, on_root
from .planner import build_cost, device_costs, forward_costs, sparse_costs, token_block
from .sparse import grouped_terms
from .walker import registry_of

__all__ = ["mixed", "group_cost", "Mixed", "inside_mixed"]

_ACTIVE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # banks of models inside a mixed block


def inside_mixed(bank) -> bool:
    """Whether the model holding ``bank`` is inside a ``randlora.mixed`` block now."""
    return bank in _ACTIVE


def group_cost(T: int, O: int, I: int, nr: int, *, density: float | None = None, quantized: bool = False,
               device: str = "cpu", threads: int = 1) -> dict[str, float]:
    """Forward multiply-adds of one group's adapter term on top of the frozen layer, per route.

    ``"activation"``: ``T·nr·(O + I)`` (through the bases); ``"weight"``: build ``W + s·ΔW``
    (:func:`randlora.planner.build_cost`: ``M·nr·m``, less through ternary bases' non-zeros), whose one matmul
    replaces the frozen one (a quantized base layer has no float ``W`` to build on: the op builds ``s·ΔW``
    through the dense views, ``M·nr·m``, and one more matmul ``T·O·I``); ``"kept"``: ``W + s·ΔW`` built earlier
    and kept (``keep_bytes``), whose matmul replaces the group's frozen one: nothing on top (a quantized base
    layer keeps ``s·ΔW``, whose matmul comes on top: ``O·I·(T + gemm_tokens)``,
    :data:`randlora.planner.DEVICE_COSTS`);
    ``"sparse"`` (ternary bases of ``density``): the planner's weighted sparse cost with ``threads`` torch
    threads. The frozen layer's own ``T·O·I`` is not counted.
    """
    c = forward_costs(T, O, I, nr, fused=not quantized, kept=True)
    tau = device_costs(device).gemm_tokens
    build = build_cost(O, I, nr, None if quantized else density, device)
    out = {"activation": float(c["activation"]), "weight": c["weight"] + build,
           "kept": float(O * I * (T + tau)) if quantized else 0.0}
    if density is not None:
        out["sparse"] = float(sparse_costs(T, O, I, nr, density, density, need_x=False, need_S=False, need_W=False,
                                           device=device, threads=threads)["forward"])
    return out


def _threads(dev: str) -> int:
    """The thread count the planner weighs ``dev``'s CPU kernels with (as the layer's own calls: torch's, 1 off
    the CPU)."""
    return torch.get_num_threads() if dev == "cpu" else 1


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

    def _kept_matrix(self, layer, name: str, ad, cd: torch.dtype) -> torch.Tensor | None:
        """The kept matrix of adapter ``name`` on ``layer`` in ``cd`` (built now if the budget allows), or None:
        ``W + s·ΔW`` (``s·ΔW`` on a quantized base layer, whose own forward stays the frozen term). Reused while
        ``λ``, ``γ``, the weight and the bank are the tensors and versions it was built from."""
        lam, gam, W = ad.randlora_lambda, ad.randlora_gamma, layer.weight
        key = (id(layer), name)
        stamp = (lam._version, gam._version, W._version, lam.data_ptr(), gam.data_ptr(), W.data_ptr(), cd,
                 getattr(layer.bank, "generation", 0))
        hit = self._kept.get(key)
        if hit is not None:
            if hit[0] == stamp:
                return hit[1]
            self.kept_bytes -= hit[1].numel() * hit[1].element_size()
            del self._kept[key]
        size = layer.out_features * layer.in_features * torch.empty((), dtype=cd).element_size()
        if self.kept_bytes + size > self.keep_bytes:
            return None
        with torch.no_grad():
            D = layer.delta_weight(name=name)
            if not layer.quantized:
                D.add_(layer._w().to(D.dtype))
            D = D.to(cd)
        self._kept[key] = (stamp, D)
        self.kept_bytes += size
        return D

    def _keep_pays(self, layer, T: int, nr: int, device: str) -> bool:
        """Whether a kept matrix (:func:`group_cost`'s ``"kept"``) is cheaper than the op's best route for a group
        of ``T`` tokens called on its own."""
        c = group_cost(T, layer.out_features, layer.in_features, nr, density=self._density,
                       quantized=layer.quantized, device=device, threads=_threads(device))
        return c.pop("kept") < min(c.values())

    def _kept_rows(self, layer, xg: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
        """The layer's output for the rows ``xg`` of a group with the kept matrix ``D`` (:meth:`_kept_matrix`):
        ``x_g (W + s·ΔW)ᵀ + b``, or ``base(x_g) + x_g (s·ΔW)ᵀ`` on a quantized base layer; in the dtype the
        layer's own forward returns."""
        if layer.quantized:
            base = layer.apply_adapter(xg, None)
            with torch.autocast(xg.device.type, enabled=False):
                return base + F.linear(xg.to(D.dtype), D).to(base.dtype)
        out_dtype = layer._compute_dtype(xg, layer.weight.dtype)[1]
        with torch.autocast(xg.device.type, enabled=False):
            y = F.linear(xg.to(D.dtype), D, layer.bias.to(D.dtype) if layer.bias is not None else None)
        return y if out_dtype is None else y.to(out_dtype)

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        """The layer's output for the whole batch, each row through its own adapter (the layer's ``forward`` inside
        the block). Per call, one of two plans: decode-sized no-grad calls run the frozen layer once for the batch
        plus one batched pass over the bases (:meth:`_batched_kind`); otherwise each group of rows goes through
        :meth:`RandLoraLinear.apply_adapter` on its own, planned like a separate batch of those rows (so the
        planner may build ``W + s·ΔW`` for a long group), and the other rows through the frozen layer."""
        self._check(layer, x)
        present = {name: ad for name in self.groups if (ad := layer.adapter(name)) is not None}
        if not present:  # this layer carries none of the batch's adapters: every row keeps the base
            return layer.apply_adapter(x, None)
        serving = not torch.is_grad_enabled() and not (
            layer.training and any(ad.drops for ad in present.values()))
        T, dev = x.numel() // x.shape[-1], x.device.type
        keeping = serving and self.keep_bytes > 0
        kind = self._batched_kind(layer, T, present, dev) if keeping else None  # (with nothing kept, rest's too)
        kept = self._kept_deltas(layer, x, present, T, kind) if keeping else {}
        rest = {name: ad for name, ad in present.items() if name not in kept}
        if not kept and len(rest) == 1 and len(self.groups[next(iter(rest))]) == len(self.names):
            return layer.apply_adapter(x, next(iter(rest.values())))  # one adapter on every row: a plain call
        if kept or not keeping:
            kind = self._batched_kind(layer, T, rest, dev) if rest and serving else None
        if kind is not None:
            return self._base_plus_terms(layer, x, kept, rest, kind)
        parts = [layer.apply_adapter(self._rows_of(x, name), ad) for name, ad in rest.items()]
        parts += [self._kept_rows(layer, self._rows_of(x, name), D) for name, D in kept.items()]
        applied = tuple(rest) + tuple(kept)
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
        """The dtype the layer's own forward computes the adapter term in (:meth:`RandLoraLinear._compute_dtype`)."""
        if layer.quantized:
            base = x.dtype if x.is_floating_point() else next(iter(present.values())).randlora_lambda.dtype
        else:
            base = layer.weight.dtype
        return layer._compute_dtype(x, base)[0]

    def _kept_deltas(self, layer, x: torch.Tensor, present: dict, T: int,
                     kind: str | None) -> dict[str, torch.Tensor]:
        """The groups that take a kept matrix (:meth:`_kept_matrix`), with that matrix. A call that would go group
        by group (``kind`` None: :meth:`_batched_kind` of every group present) keeps each group whose kept matrix
        beats its route (:meth:`_keep_pays`), as the budget allows. A call that would take the batched pass keeps
        every group or none (:meth:`_keep_all_pays`): the pass runs over every row whatever some groups keep."""
        cd, t, dev = self._compute_dtype(layer, x, present), T // len(self.names), x.device.type
        tokens = {name: len(self.groups[name]) * t for name in present}
        if kind is None:
            want = [nm for nm, ad in present.items()
                    if self._keep_pays(layer, tokens[nm], ad.randlora_lambda.numel(), dev)]
        else:
            size = layer.out_features * layer.in_features * torch.empty((), dtype=cd).element_size()
            new = sum((id(layer), nm) not in self._kept for nm in present)
            if self.kept_bytes + new * size > self.keep_bytes or not self._keep_all_pays(layer, T, tokens, kind, dev):
                return {}
            want = list(present)
        out = {}
        for name in want:
            D = self._kept_matrix(layer, name, present[name], cd)
            if D is not None:
                out[name] = D
        return out if kind is None or len(out) == len(present) else {}

    def _keep_all_pays(self, layer, T: int, tokens: dict, kind: str, dev: str) -> bool:
        """Whether every group's kept matmul, ``O·I·(T_g + gemm_tokens)`` each (twice on a quantized base layer:
        its own forward too), gathering and scattering the rows (``T·(I + O)`` values copied, weighed as the
        sparse route's one-thread copies; none when one group holds every row) and each group's fixed
        ``group_overhead`` beat the batched call: the frozen matmul ``O·I·(T + gemm_tokens)`` plus the pass,
        ``T·nr·(O + I)`` through the bases' dense views or the groups' sparse costs."""
        O, I, nr, dc = layer.out_features, layer.in_features, layer.n * layer.r, device_costs(dev)
        tau, copy = dc.gemm_tokens, dc.layout_weight
        kept = sum(O * I * (T_g + tau) for T_g in tokens.values()) * (2 if layer.quantized else 1)
        if not (len(tokens) == 1 and len(self.groups[next(iter(tokens))]) == len(self.names)):
            kept += copy * T * (I + O) + dc.group_overhead * len(tokens)
        if kind == "sparse":
            pass_cost = sum(group_cost(T_g, O, I, nr, density=self._density, quantized=layer.quantized, device=dev,
                                       threads=_threads(dev))["sparse"] for T_g in tokens.values())
        else:
            pass_cost = T * nr * (O + I)
        return kept < O * I * (T + tau) + pass_cost

    def _base_plus_terms(self, layer, x: torch.Tensor, kept: dict, rest: dict, kind: str) -> torch.Tensor:
        """The frozen layer once for the batch plus one batched pass for ``rest``; then the kept groups' rows
        replaced by theirs (:meth:`_kept_rows`)."""
        out = layer.apply_adapter(x, None)
        with torch.autocast(x.device.type, enabled=False):
            cd = self._compute_dtype(layer, x, rest)
            if kind == "dense" and self._density is not None and x.device.type == "cpu" and cd.itemsize < 4:
                cd = torch.float32  # ternary bases: sum in float32 on the CPU, as their sparse route does
            batched = self._sparse_batched if kind == "sparse" else self._batched
            out = out + batched(layer, x.to(cd), list(rest.items())).to(out.dtype)
        for name, D in kept.items():
            rows = self._kept_rows(layer, self._rows_of(x, name), D).to(out.dtype)
            out.index_copy_(0, self.rows(name, x.device), rows)
        return out

    def _rows_of(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The rows of adapter ``name``: a view when they are one run of rows, else gathered."""
        run = self._runs[name]
        return x[run] if run is not None else x.index_select(0, self.rows(name, x.device))

    def _batched_kind(self, layer, T: int, rest: dict, dev: str) -> str | None:
        """Whether one batched pass over every row (per-row ``λ``/``γ``) beats one op call per group, and which:
        ``"sparse"`` (ternary bases, :func:`randlora.sparse.grouped_terms`) when each group's cheapest route on
        its own ``T_g`` tokens is the sparse one (the pass then does the same multiply-adds, but the frozen
        matmul and the ``B_flat`` product run once for all rows instead of once per group) and no group fills
        the device's token block of the sparse route (:func:`randlora.planner.token_block`; a group that does
        runs the op's blocked route on its own as well); else ``"dense"`` (through the bases' dense views) when it
        moves fewer values, ``2·T·n·m + M·n·r`` (a ``T × n × m`` temporary written and read, the bases read once)
        against ``G·(2·n·r·m + M·n·r)`` (each of the ``G`` calls writes and reads its ``n·r × m`` scaled bases and
        reads the bases); else None. Only with the layer's ``path`` at ``"auto"``."""
        if layer.path != "auto":
            return None
        n, r, m, M = layer.n, layer.r, layer.m, layer.M
        if self._density is not None:
            O, I, t = layer.out_features, layer.in_features, T // len(self.names)
            Tg = [len(self.groups[nm]) * t for nm in rest]
            costs = [group_cost(T_g, O, I, n * r, density=self._density, quantized=layer.quantized, device=dev,
                                threads=_threads(dev)) for T_g in Tg]
            sparse_best = all(c["sparse"] <= min(v for k, v in c.items() if k != "kept") for c in costs)
            if sparse_best and max(Tg) < (self._block(dev) or T + 1):
                return "sparse"
        return "dense" if 2 * T * n * m + M * n * r < len(rest) * (2 * n * r * m + M * n * r) else None

    @staticmethod
    def _block(dev: str) -> int | None:
        """The sparse route's token block on ``dev`` now (:func:`randlora.planner.token_block`; None: none)."""
        return token_block(dev, _threads(dev))

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
        A, Bf = layer._views()
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

    def _sparse_batched(self, layer, x: torch.Tensor, rest: list) -> torch.Tensor:
        """Every adapter of ``rest`` in one pass over ternary bases' non-zeros (:func:`randlora.sparse.grouped_terms`:
        the ``B_flat`` product once for all rows, the ``S`` product per adapter on its rows' tokens)."""
        xf = x.reshape(-1, x.shape[-1])
        t = xf.shape[0] // len(self.names)
        groups = [(ad.randlora_lambda, ad.randlora_gamma, ad.scaling, self._tokens(nm, t, x.device)) for nm, ad in rest]
        idx = layer.bank.sparse_index(layer.out_features, layer.in_features)
        return grouped_terms(xf, idx, layer.out_features, groups, self._block(x.device.type)).reshape(*x.shape[:-1], -1)

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


def _after_block(layer, path: str, x: torch.Tensor) -> torch.Tensor:
    """An adapted layer's ``forward`` from the end of a ``mixed`` block to its next call. A call from inside a
    backward pass is activation checkpointing re-running, outside the block, a forward that ran inside it
    (reentrant checkpointing runs that forward without gradients, so any call of the block may be one): every
    row would take the active adapter and the gradients would be wrong, so it is refused. Any other call is a
    new forward: the layer gets its own ``forward`` back."""
    if getattr(torch._C, "_current_graph_task_id", lambda: -1)() != -1:
        raise StateError(
            f"the adapted layer {path!r} is being re-run during backward after a randlora.mixed(...) block ended: "
            "activation checkpointing recomputes the forward in backward, and a forward that ran inside the block "
            "must be recomputed inside it (outside, every row would take the active adapter: wrong gradients). "
            "Call loss.backward() inside the `with randlora.mixed(...)` block")
    layer.__dict__.pop("forward", None)
    return layer.forward(x)


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
            every group beats the batched pass: :meth:`Mixed._keep_all_pays`; docs/serving.md); 0 (default)
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
    bank = layers[0][1].bank if layers else None
    if bank is not None and bank in _ACTIVE:
        raise StateError("the model is already inside randlora.mixed(...); leave that block first (one block per "
                         "model at a time)")
    density = layers[0][1]._density() if layers else None
    state = Mixed(names, {id(l): p for p, l in layers}, keep_bytes, density)
    try:
        if bank is not None:
            _ACTIVE.add(bank)
        for _, l in layers:
            l.forward = functools.partial(state.forward, l)
        yield state
    finally:
        for p, l in layers:  # until its next call, a layer refuses to be re-run by backward (checkpointing)
            l.forward = functools.partial(_after_block, l, p)
        if bank is not None:
            _ACTIVE.discard(bank)
        state._kept.clear()
