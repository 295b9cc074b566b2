"""The route planner: one pure function of a call decides every route the op takes for it.

A call of an adapted layer is described by its shapes, dtype, device type, grad mode, which inputs need
gradients, the layer's explicit settings (``path``, ``keep``) and whether a ``randlora.cached`` block is
active. :func:`plan_call` turns that into a :class:`Route` (a small frozen dataclass): dense or sparse, the
forward route, whether ``W + s·ΔW`` is built before the op (and kept for backward), the ``∂x`` and
``∂λ/∂γ`` routes, the sparse route's token block. The layer plans once per call; the ops' forward and
backward read the route and never plan again.

The decisions compare multiply-add counts (:func:`forward_costs`, :func:`backward_costs`,
:func:`sparse_costs`) with the per-device constants of :data:`DEVICE_COSTS`: each one says which command
measured it. The CPU row was measured on a 2-core CPU; the CUDA row (used for every non-CPU device) comes
from arithmetic counts until a GPU run measures it (``benchmarks/gpu_check.sh``), so no CPU-measured
constant decides a CUDA route. Nothing here imports ``torch``: the planner is arithmetic on the call.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Route",
    "DeviceCosts",
    "DEVICE_COSTS",
    "device_costs",
    "token_block",
    "plan_call",
    "op_route",
    "sparse_op_route",
    "forward_costs",
    "backward_costs",
    "plan",
    "keep_pays",
    "sparse_costs",
    "sparse_pays",
    "padded_width",
    "build_cost",
    "sparse_build_pays",
    "PATHS",
    "KEEP_POLICIES",
]

PATHS = ("auto", "weight", "activation")
KEEP_POLICIES = ("auto", "always", "never")


# ------------------------------------------------------------------------------------------------
# per-device cost constants
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceCosts:
    """The constants the planner uses on one device type; ``measured_by`` gives, per field, the command that
    measured it (or how it was derived)."""

    spmm_weight: float
    """Time per multiply-add of a sparse × dense product (``embedding_bag``) against a dense GEMM's."""
    sampled_weight: float
    """Time per multiply-add of the sampled ``∂S`` product (gather + ``bmm``) against a dense GEMM's."""
    keep_memory_ratio: float
    """A kept ``W + s·ΔW`` may be at most this many times the saved input ``T × I`` (``O <= ratio · T``)."""
    keep_reuse_ratio: float
    """... and this many times inside ``randlora.cached`` (the build is shared by the block's calls)."""
    token_block: int | None
    """The sparse route's token block with one torch thread (None: one block of all tokens)."""
    token_block_threaded: int | None
    """... with more threads."""
    scratch: bool
    """Reuse per-thread scratch buffers for the ops' transients (False where the allocator already pools)."""
    layout_weight: float
    """Time per element of the sparse route's token-major copies (the input into token blocks, the blocks added
    back into the output) against a dense GEMM's per multiply-add, with one torch thread."""
    layout_weight_threaded: float
    """... with more threads (a GEMM speeds up with them, a copy much less)."""
    gemm_tokens: int
    """A dense ``x Wᵀ`` of ``T`` tokens takes about as long as ``T + gemm_tokens`` tokens' multiply-adds at the
    rate of long ones (reading ``W`` and starting the kernel): what one more matmul costs beyond its own work."""
    group_overhead: float
    """What one more group of rows costs a ``randlora.mixed`` call that goes group by group, beyond its
    multiply-adds and copies (Python, kernel starts), in GEMM multiply-adds."""
    build_weight: float
    """Time of building ``W + s·ΔW`` through ternary bases' non-zeros (:func:`randlora.sparse.sparse_delta`) per
    multiply-add it does (``M·n·r·m·density``), against a dense GEMM's per multiply-add."""
    measured_by: dict[str, str] = field(default_factory=dict, compare=False, repr=False)


DEVICE_COSTS: dict[str, DeviceCosts] = {
    "cpu": DeviceCosts(
        spmm_weight=5.0, sampled_weight=5.0, keep_memory_ratio=1.0, keep_reuse_ratio=3.0,
        token_block=64, token_block_threaded=512, scratch=True, layout_weight=130.0, layout_weight_threaded=250.0,
        gemm_tokens=40, group_overhead=8e6, build_weight=12.0,
        measured_by={
            "spmm_weight": "python benchmarks/sparse_op.py --kernels (2-core CPU, fp32; docs/sparse.md)",
            "sampled_weight": "python benchmarks/sparse_op.py --kernels (2-core CPU, fp32; docs/sparse.md)",
            "keep_memory_ratio": "python benchmarks/step.py --grid all:1024 --keep never --reps 3 --steps 1 "
                                 "against --keep auto (peak RSS vs time; docs/performance.md)",
            "keep_reuse_ratio": "python benchmarks/cache.py (the build shared by a cached block's calls)",
            "token_block": "python benchmarks/sparse_op.py (one thread; blocks of 64 vs 512 tokens)",
            "token_block_threaded": "python benchmarks/sparse_op.py (two threads; blocks of 64 vs 512 tokens)",
            "scratch": "python benchmarks/step.py --grid all:1024 (peak RSS with and without, -60-100 MB)",
            "layout_weight": "python benchmarks/sparse_op.py --kernels --threads 1 (input to blocks 80-250, blocks "
                             "added to output 90-250; T = 512, 2048, widths 384-2816; docs/sparse.md)",
            "layout_weight_threaded": "python benchmarks/sparse_op.py --kernels (two threads: 130-530 and 120-680, "
                                      "the wide transposed adds the slowest; copies that stay in cache cost less), "
                                      "then python benchmarks/sparse_op.py --routes: 250 picks the fastest route "
                                      "in 12 of its 14 calls (docs/sparse.md)",
            "gemm_tokens": "python benchmarks/serving.py --gemm-tokens --reps 60 (t(T) fitted as c·(T + gemm_tokens) "
                           "through T = 64 and 512, each call reading a weight out of cache as kept matrices are: "
                           "30-41 at the Llama's and MiniLM's widths, two threads; docs/serving.md)",
            "group_overhead": "python benchmarks/serving.py --gemm-tokens (last line: 50-63 µs per group and layer "
                              "call, 7.9-9.0 M multiply-adds of a GEMM at 130-168 G/s)",
            "build_weight": "python benchmarks/sparse_op.py --builds --reps 15 (9.1-13.9 for very_sparse bases at "
                            "widths 384-2816, 4.2-10.9 for sparse ones; two threads; docs/sparse.md)",
        }),
    "cuda": DeviceCosts(
        spmm_weight=80.0, sampled_weight=8.0, keep_memory_ratio=1.0, keep_reuse_ratio=3.0,
        token_block=None, token_block_threaded=None, scratch=False, layout_weight=400.0,
        layout_weight_threaded=400.0, gemm_tokens=200, group_overhead=2e10, build_weight=80.0,
        measured_by={
            "spmm_weight": "arithmetic (H100/H200 bf16): dense GEMM ~4.9e14 MAC/s; a gather reads one element "
                           "per multiply-add, ~6e12/s from L2 (~1.2e13 B/s, 2 B) -> ~80. To measure: "
                           "python benchmarks/sparse_op.py --kernels --device cuda (benchmarks/gpu_check.sh)",
            "sampled_weight": "arithmetic: bmm (n x T)(T x J) with n, J ~ 30-100 reads (n+J)T elements for n·J·T "
                              "MACs, ~20-40 MAC/element at ~2.4e12 elements/s HBM -> 5-10x below peak; 8. To "
                              "measure: python benchmarks/sparse_op.py --kernels --device cuda",
            "keep_memory_ratio": "a memory bound, not a timing: the kept O x I copy is at most the saved input",
            "keep_reuse_ratio": "a memory bound, as on the CPU (3 saved inputs)",
            "token_block": "one block of all tokens: no cache-sized blocking on a GPU",
            "token_block_threaded": "as token_block",
            "scratch": "the CUDA caching allocator already pools",
            "layout_weight": "arithmetic (H100/H200 bf16): a copy reads and writes each element, ~1.2e12 "
                             "elements/s at ~4.8e12 B/s, against ~4.9e14 MAC/s -> ~400. To measure: python "
                             "benchmarks/sparse_op.py --kernels --device cuda",
            "layout_weight_threaded": "as layout_weight (one stream)",
            "gemm_tokens": "arithmetic (H100/H200 bf16): ~4.9e14 MAC/s over ~2.4e12 values/s read from HBM -> ~200. "
                           "To measure: python benchmarks/serving.py --gemm-tokens --device cuda",
            "group_overhead": "arithmetic: about 40 µs of Python and kernel starts per group at ~4.9e14 MAC/s. "
                              "Not measured on a GPU yet (the --gemm-tokens overhead line runs on the CPU)",
            "build_weight": "arithmetic: the build's sparse product is an embedding_bag gather, as spmm_weight (80): "
                            "dense builds on a GPU. To measure: python benchmarks/sparse_op.py --builds (CPU only)",
        }),
}


def device_costs(device_type: str) -> DeviceCosts:
    """The constants for ``device_type``: the CPU's on ``"cpu"``, the CUDA row (arithmetic counts) elsewhere."""
    return DEVICE_COSTS["cpu"] if device_type == "cpu" else DEVICE_COSTS["cuda"]


# ------------------------------------------------------------------------------------------------
# the route
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    """Every route of one call, decided once (see :func:`plan_call`).

    Attributes:
        kind: ``"dense"`` (``ops.RandLoraFunction``) or ``"sparse"`` (``sparse.SparseRandLoraFunction``).
        forward: ``"weight"`` (build ``W + s·ΔW``, one matmul), ``"activation"`` (``x → S → B``), ``"kept"``
            (one matmul with a ``W + s·ΔW`` built before the op) or ``"sparse"``.
        build: where that prebuilt ``W + s·ΔW`` comes from: None, ``"fresh"`` (built through the bases' dense
            views), ``"sparse"`` (through ternary bases' non-zeros, :func:`sparse_build_pays`) or ``"cached"``
            (``s·ΔW`` from the layer's ``randlora.cached`` entry).
        grad_x: ``∂x`` route: None (not needed), ``"kept"``, ``"fused"``, ``"act"`` or ``"sparse"``.
        grad_S: ``∂λ/∂γ`` route: None, ``"G"`` (``B_flatᵀ(gyᵀx)``), ``"act"`` (``(gy B_flat)ᵀx``) or
            ``"sampled"`` (sparse: at ``S``'s pattern).
        grad_W: whether backward computes the frozen weight's gradient.
        block: the sparse route's token block (None: all tokens at once).
        cost: predicted extra multiply-adds over the frozen layer, forward + backward (sparse: weighted).
        why: the decisions that led here, one line each, with the candidates and their predicted costs (not
            part of the route's identity: two routes that run the same way compare equal). :meth:`explain`.
    """

    kind: str
    forward: str
    build: str | None = None
    grad_x: str | None = None
    grad_S: str | None = None
    grad_W: bool = False
    block: int | None = None
    cost: float = 0.0
    why: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def explain(self) -> str:
        """Readable text: the route taken, then each decision the planner made for the call, with every candidate
        it weighed and its predicted cost (extra multiply-adds over the frozen layer, forward + backward; the
        sparse route's weighted by the device's constants), and which bound (memory or cost) decided whether
        ``W + s·ΔW`` is built before the op. ``layer.route(tokens).explain()`` answers "why is this layer slow"."""
        taken = (f"route: {self.kind}, forward {self.forward}"
                 + (f" (W + s·ΔW built {self.build} before the op)" if self.build else "")
                 + f", ∂x {self.grad_x or 'not needed'}, ∂λ/∂γ {self.grad_S or 'not needed'}"
                 + (", ∂W" if self.grad_W else "") + (f", token block {self.block}" if self.block else "")
                 + f"; predicted extra cost {self.cost:.3g} multiply-adds")
        return "\n".join([taken, *(f"- {line}" for line in self.why)])

    @property
    def keeps(self) -> tuple[str, ...]:
        """What backward keeps besides the parameters and references to ``W`` and the bases."""
        if self.grad_x is None and self.grad_S is None and not self.grad_W:
            return ()
        return ("x", "W + s·ΔW") if self.build is not None else ("x",)


# ------------------------------------------------------------------------------------------------
# cost model (multiply-adds)
# ------------------------------------------------------------------------------------------------
def forward_costs(T: int, O: int, I: int, nr: int, fused: bool, kept: bool = False) -> dict[str, int]:
    """Extra multiply-adds over the frozen layer for each forward path (``kept``: ``W + s·ΔW`` prebuilt)."""
    build = 0 if kept else max(O, I) * nr * min(O, I)
    return {
        "weight": build + (0 if fused else T * O * I),
        "activation": T * nr * (O + I),
    }


def backward_costs(T: int, O: int, I: int, nr: int, tr: bool, fused: bool, need_x: bool, need_S: bool,
                   need_W: bool, kept: bool = False) -> dict[tuple[str | None, str | None], int]:
    """Extra multiply-adds over the frozen layer's backward for each (∂x route, ∂S route).

    ∂x: ``"kept"`` (``gy @ weff``, free), ``"fused"`` (rebuild ``W + s·ΔW``), ``"act"`` (through the
    bases). ∂S: ``"G"`` (``B_flatᵀ (gyᵀ x)``) or ``"act"`` (``(gy B_flat)ᵀ x``; shares ``gy B_flat`` with
    the ``"act"`` ∂x route when ``I <= O``).
    """
    build = max(O, I) * nr * min(O, I)
    G = T * O * I
    if need_x:
        xr = ["kept", "act"] if kept and fused else ["fused", "act"]
    else:
        xr = [None]
    sr = ["G", "act"] if need_S else [None]
    out = {}
    for a in xr:
        for b in sr:
            c = G if (need_W or b == "G") else 0  # gyᵀx
            if a == "fused":
                c += build + (0 if fused else T * O * I)
            elif a == "act":
                c += T * nr * (O + I)
            if b == "G":
                c += build
            elif b == "act":
                if tr:
                    c += T * I * nr + T * nr * O  # (x B)ᵀ gy
                else:
                    c += T * nr * I + (0 if a == "act" else T * O * nr)  # (gy B)ᵀ x, gy B shared
            out[(a, b)] = c
    return out


def plan(T: int, O: int, I: int, nr: int, *, fused: bool = True, path: str = "auto", need_x: bool = True,
         need_S: bool = True, need_W: bool = False, kept: bool = False) -> dict[str, Any]:
    """The dense routes for a call of ``T`` tokens, with their costs (multiply-adds).

    ``kept``: a prebuilt ``W + s·ΔW`` is passed in (forward is then one plain matmul with it).
    """
    tr = O < I
    kept = kept and fused
    fc = forward_costs(T, O, I, nr, fused, kept)
    if kept:
        fwd = "weight"
    else:
        fwd = min(fc, key=fc.__getitem__) if path == "auto" else path
    bc = backward_costs(T, O, I, nr, tr, fused, need_x, need_S, need_W, kept)
    if path == "weight":
        bc = {k: v for k, v in bc.items() if k[0] in ("kept", "fused", None) and k[1] in ("G", None)}
    elif path == "activation":
        bc = {k: v for k, v in bc.items() if k[0] in ("act", None) and k[1] in ("act", None)}
    bwd = min(bc, key=bc.__getitem__)
    return {"forward": fwd, "forward_cost": fc[fwd], "backward": bwd, "backward_cost": bc[bwd],
            "base_cost": 2 * T * O * I, "forward_costs": {"weight": fc["weight"]} if kept else fc,
            "backward_costs": bc}


def _keep(T: int, O: int, I: int, nr: int, path: str, policy: str, need_x: bool, need_S: bool, need_W: bool,
          reuse: bool, dc: DeviceCosts, build: float) -> tuple[bool, str]:
    """Whether a training call keeps ``W + s·ΔW`` for backward, and what decided it (setting, memory, cost)."""
    if policy not in KEEP_POLICIES:
        raise ValueError(f"keep must be one of {KEEP_POLICIES}, got {policy!r}")
    if policy == "never" or path == "activation":
        return False, f"keep W + s·ΔW: no (setting: keep={policy!r}, path={path!r})"
    if policy == "always":
        return True, "keep W + s·ΔW: yes (setting: keep='always')"
    ratio = dc.keep_reuse_ratio if reuse else dc.keep_memory_ratio
    if O > ratio * T:
        return False, (f"keep W + s·ΔW: no, by the memory bound (the kept {O}×{I} may be at most {ratio:g}× the "
                       f"saved {T}×{I} input: O <= {ratio:g}·T)")
    a = plan(T, O, I, nr, path=path, need_x=need_x, need_S=need_S, need_W=need_W)
    b = plan(T, O, I, nr, path=path, need_x=need_x, need_S=need_S, need_W=need_W, kept=True)
    build = 0 if reuse else build  # shared by the micro-batches when reused
    kept, plain = b["forward_cost"] + b["backward_cost"] + build, a["forward_cost"] + a["backward_cost"]
    return kept < plain, (f"keep W + s·ΔW: {'yes' if kept < plain else 'no'}, by cost (kept {kept:.3g}"
                          f"{' with the build shared by the cached calls' if reuse else ''} against {plain:.3g}; "
                          f"within the memory bound O <= {ratio:g}·T)")


def keep_pays(T: int, O: int, I: int, nr: int, path: str = "auto", policy: str = "auto",
              need_x: bool = True, reuse: bool = False, device: str = "cpu", density: float | None = None) -> bool:
    """Whether to build ``W + s·ΔW`` once and keep it for backward (and for further micro-batches).

    ``"auto"``: when that lowers the step's multiply-adds AND the kept ``O × I`` matrix is no larger than
    ``keep_memory_ratio`` times the ``T × I`` input that backward saves anyway (``O <= ratio · T``).
    ``reuse``: the layer caches ``s·ΔW`` (an explicit setting, see :func:`randlora.cached`), so the build
    is shared by several calls: it is not counted, and the memory bound is ``keep_reuse_ratio``
    (:data:`DEVICE_COSTS`). ``density``: ternary bases' density (the build then costs :func:`build_cost`).
    A pure function of its arguments: the same call always takes the same route.
    """
    return _keep(T, O, I, nr, path, policy, need_x, True, False, reuse, device_costs(device),
                 build_cost(O, I, nr, density, device))[0]


def build_cost(O: int, I: int, nr: int, density: float | None = None, device: str = "cpu") -> float:
    """What building ``s·ΔW`` (or ``W + s·ΔW``) once costs, in GEMM multiply-adds: ``M·n·r·m`` through the bases'
    dense views, or ``build_weight · M·n·r·m · density`` through ternary bases' non-zeros where that is less
    (:func:`sparse_build_pays`)."""
    full = float(max(O, I) * nr * min(O, I))
    return full * device_costs(device).build_weight * density if sparse_build_pays(density, device) else full


def sparse_build_pays(density: float | None, device: str = "cpu") -> bool:
    """Whether ``s·ΔW`` of ternary bases of ``density`` is built through their non-zeros
    (:func:`randlora.sparse.sparse_delta`) rather than their dense views on ``device``: when ``build_weight ·
    density < 1`` (both builds do ``M·n·r·m`` multiply-adds at full density). False for dense bases (None)."""
    return density is not None and device_costs(device).build_weight * density < 1.0


def padded_width(m: int, density: float, r: int = 32) -> float:
    """Expected ``J = max_k |J_k|`` for ``r`` rows of ``m`` i.i.d. entries of ``density`` (mean + ~2.5σ,
    the typical maximum of ``r`` binomials), capped at ``m``. Used by the cost model."""
    mu = m * density
    sd = math.sqrt(max(mu * (1.0 - density), 0.0))
    z = math.sqrt(2.0 * math.log(max(r, 2)))
    return min(float(m), mu + z * sd + 1.0)


def sparse_costs(T: int, O: int, I: int, nr: int, density_A: float, density_B: float, *, need_x: bool = True,
                 need_S: bool = True, need_W: bool = False, weighted: bool = True, r: int = 32,
                 device: str = "cpu", threads: int = 1) -> dict[str, float]:
    """Extra multiply-adds over the frozen layer of the sparse route, forward and backward.

    Same convention as :func:`forward_costs` / :func:`backward_costs` (the frozen ``x Wᵀ`` and ``gy W`` are not
    counted; ``gyᵀ x`` is, when ``W`` needs a gradient). A product with ``S`` or ``Sᵀ`` costs
    ``T·n·r·m·density_A``, one with ``B_flat`` or ``B_flatᵀ`` ``T·M·n·r·density_B``, the sampled ``∂S``
    ``T·n·r·J`` with ``J`` the padded non-zeros per row of ``A`` (:func:`padded_width`). Forward: one ``S`` and
    one ``B`` product. Backward: ``∂x`` one of each; ``∂S`` the sampled product plus a ``B`` product (shared
    with ``∂x`` when ``I <= O``; when ``O < I`` it recomputes ``x B_flat`` rather than keep it). Weighted, a
    call also pays its token-major copies, ``layout_weight`` per element: forward ``T·(I + O)`` (the input into
    token blocks, the blocks added to the output); backward ``T·(O + I)`` for ``∂x`` (``gy`` in, ``∂x`` out)
    and, for ``∂S`` alone, ``gy`` (``I <= O``) or ``x`` (``O < I``) into blocks.

    Args:
        T, O, I: tokens, output and input width.
        nr: ``n·r`` (``λ.numel()``).
        density_A, density_B: fraction of non-zeros of the layer's ``A`` and ``B_flat`` views.
        need_x, need_S, need_W: which gradients backward computes.
        weighted: multiply the sparse products by ``spmm_weight`` / ``sampled_weight`` of ``device``'s
            :data:`DEVICE_COSTS` row (their time per multiply-add against a dense GEMM's), so the figures
            compare with the dense costs.
        r: the rank (for the padding estimate).
        device: the device type whose constants weigh the products.
        threads: torch's thread count (picks ``layout_weight`` or ``layout_weight_threaded``).

    Returns:
        ``{"forward": ..., "backward": ..., "total": ...}``.
    """
    m, M = min(O, I), max(O, I)
    dc = device_costs(device)
    wsp, wsa = (dc.spmm_weight, dc.sampled_weight) if weighted else (1.0, 1.0)
    sS = wsp * T * nr * m * density_A
    sB = wsp * T * M * nr * density_B
    sD = wsa * T * nr * padded_width(m, density_A, r)
    wl = (dc.layout_weight if threads == 1 else dc.layout_weight_threaded) if weighted else 0.0
    fwd = sS + sB + wl * T * (I + O)
    bwd = float(T * O * I) if need_W else 0.0
    if need_x:
        bwd += sS + sB + wl * T * (O + I)
    if need_S:
        bwd += sD + (sB if (O < I or not need_x) else 0.0)
        bwd += wl * T * (I if O < I else (0 if need_x else O))
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd}


def _dense_floor(T: int, O: int, I: int, nr: int, fused: bool, need_x: bool, need_S: bool,
                 need_W: bool, build: float, dc: DeviceCosts) -> float:
    """The cheapest dense plan's cost (path auto; without and, when fused, with a ``W + s·ΔW`` prebuilt at
    ``build``, which a call that needs gradients keeps only within ``keep_memory_ratio``)."""
    p = plan(T, O, I, nr, fused=fused, need_x=need_x, need_S=need_S, need_W=need_W)
    dense = p["forward_cost"] + p["backward_cost"]
    if fused and (not (need_x or need_S or need_W) or O <= dc.keep_memory_ratio * T):
        k = plan(T, O, I, nr, fused=True, need_x=need_x, need_S=need_S, need_W=need_W, kept=True)
        dense = min(dense, k["forward_cost"] + k["backward_cost"] + build)
    return dense


def sparse_pays(T: int, O: int, I: int, nr: int, density_A: float, density_B: float, *, fused: bool = True,
                need_x: bool = True, need_S: bool = True, need_W: bool = False, r: int = 32,
                device: str = "cpu", threads: int = 1) -> bool:
    """Whether the sparse route's weighted cost is below the cheapest dense plan's (:func:`plan`, path auto,
    without and, when ``W`` is given, with a prebuilt ``W + s·ΔW``, whose build is then counted at
    :func:`build_cost` of ``density_B``, and which a call needing gradients keeps only within
    ``keep_memory_ratio``).

    Args:
        T, O, I, nr, density_A, density_B, need_x, need_S, need_W, r, device, threads: as :func:`sparse_costs`.
        fused: ``W`` is given (as :func:`plan`).

    Returns:
        True when the sparse route is predicted cheaper for this call.
    """
    sc = sparse_costs(T, O, I, nr, density_A, density_B, need_x=need_x, need_S=need_S, need_W=need_W, r=r,
                      device=device, threads=threads)
    return sc["total"] < _dense_floor(T, O, I, nr, fused, need_x, need_S, need_W,
                                      build_cost(O, I, nr, density_B, device), device_costs(device))


# ------------------------------------------------------------------------------------------------
# the planner
# ------------------------------------------------------------------------------------------------
def op_route(T: int, O: int, I: int, nr: int, *, fused: bool = True, path: str = "auto", need_x: bool = True,
             need_S: bool = True, need_W: bool = False, kept: bool = False) -> Route:
    """The dense op's :class:`Route` for a direct call of the op (``kept``: a prebuilt ``W + s·ΔW`` is handed
    to it). Layers plan with :func:`plan_call`."""
    return _dense(T, O, I, nr, fused, path, need_x, need_S, need_W, kept, None, 0.0)


def sparse_op_route(T: int, device: str = "cpu", threads: int = 1, *, need_x: bool = True, need_S: bool = True,
                    need_W: bool = False) -> Route:
    """The sparse op's :class:`Route` for a direct call of the op. Layers plan with :func:`plan_call`."""
    return _sparse(T, device, threads, need_x, need_S, need_W, 0.0)


def _dense(T: int, O: int, I: int, nr: int, fused: bool, path: str, need_x: bool, need_S: bool, need_W: bool,
           kept: bool, build: str | None, build_mac: float, why: tuple[str, ...] = ()) -> Route:
    p = plan(T, O, I, nr, fused=fused, path=path, need_x=need_x, need_S=need_S, need_W=need_W, kept=kept)
    xr, sr = p["backward"]
    kept = kept and fused
    cost = p["forward_cost"] + p["backward_cost"] + (build_mac if build in ("fresh", "sparse") else 0)
    fwd = "kept" if kept else p["forward"]
    lines = [f"forward: {_candidates(p['forward_costs'], p['forward'])}" + (" (one matmul with the prebuilt "
                                                                            "W + s·ΔW)" if kept else "")]
    if need_x or need_S or need_W:
        names = {k: f"∂x {k[0] or '-'} / ∂λ∂γ {k[1] or '-'}" for k in p["backward_costs"]}
        lines.append("backward: " + _candidates({names[k]: v for k, v in p["backward_costs"].items()},
                                                names[p["backward"]]))
    if kept and build in ("fresh", "sparse"):
        lines.append(f"building W + s·ΔW ({build}) costs {build_mac:.3g}")
    return Route("dense", fwd, build if kept else None, xr, sr, need_W and fused, None, float(cost),
                 (*why, *lines))


def _candidates(costs: dict, chosen) -> str:
    """``a 1.2e+06 (chosen), b 3.4e+06``: each candidate with its cost, the chosen one marked."""
    return ", ".join(f"{k} {v:.3g}{' (chosen)' if k == chosen else ''}" for k, v in costs.items())


def token_block(device: str, threads: int) -> int | None:
    """The sparse route's token block on ``device`` with ``threads`` torch threads (None: no blocking)."""
    dc = device_costs(device)
    return dc.token_block if threads == 1 else dc.token_block_threaded


def _sparse(T: int, device: str, threads: int, need_x: bool, need_S: bool, need_W: bool, cost: float,
            why: tuple[str, ...] = ()) -> Route:
    """The sparse route; its token block is the device's (one block of all tokens when ``T`` fits in one, or on
    devices without blocking)."""
    c = token_block(device, threads)
    block = c if (c is not None and T > c) else None
    return Route("sparse", "sparse", None, "sparse" if need_x else None, "sampled" if need_S else None, need_W,
                 block, float(cost), why)


def plan_call(*, T: int, O: int, I: int, nr: int, r: int, device: str = "cpu", grad: bool = True,
              need_x: bool = True, need_S: bool = True, need_W: bool = False, fused: bool = True,
              path: str = "auto", keep: str = "auto", cached: bool = False, density: float | None = None,
              threads: int = 1, compiling: bool = False) -> Route:
    """Every route of one call of an adapted layer: a pure function of its arguments and of the device's
    :data:`DEVICE_COSTS` row, memoised on both (a layer called again with the same shape and settings gets the
    same frozen :class:`Route` back; a changed cost row is a new key).

    Args:
        T, O, I: tokens, output and input width. nr, r: ``n·r`` and the rank.
        device: the device type (``"cpu"``, ``"cuda"``, ...): picks the :data:`DEVICE_COSTS` row.
        grad: grad mode is on. need_x, need_S, need_W: ``x``, ``λ``/``γ``, ``W`` require gradients.
        fused: ``W`` is handed to the op (False: the adapter term alone, as under dropout or a quantised base).
        path, keep: the layer's explicit settings (``"sparse"`` forces the sparse route).
        cached: the layer sits inside :func:`randlora.cached` (its ``s·ΔW`` may be reused).
        density: the ternary bases' density (None: dense bases; no sparse route).
        threads: torch's thread count (the CPU's token block and copy weight depend on it).
        compiling: under ``torch.compile`` (no prebuilt ``W + s·ΔW``).
    """
    return _plan_call(device_costs(device), T, O, I, nr, r, device, grad, need_x, need_S, need_W, fused, path, keep,
                      cached, density, threads, compiling)


@functools.lru_cache(maxsize=4096)
def _plan_call(costs: DeviceCosts, T: int, O: int, I: int, nr: int, r: int, device: str, grad: bool, need_x: bool,
               need_S: bool, need_W: bool, fused: bool, path: str, keep: str, cached: bool, density: float | None,
               threads: int, compiling: bool) -> Route:
    """:func:`plan_call`, memoised (``costs``, the device's row it reads, is part of the key)."""
    need_x, need_S, need_W = grad and need_x, grad and need_S, grad and need_W and fused
    density = None if compiling else density  # (under torch.compile nothing is prebuilt)
    build = build_cost(O, I, nr, density, device)
    why = [f"call: {T} tokens, {O}×{I}, n·r = {nr}, {device}, {'grad' if grad else 'no grad'} (needs: "
           f"{', '.join(k for k, v in (('∂x', need_x), ('∂λ/∂γ', need_S), ('∂W', need_W)) if v) or 'none'}), "
           f"path={path!r}, keep={keep!r}{', inside randlora.cached' if cached else ''}"
           f"{f', ternary bases of density {density:.3g}' if density is not None else ''}"]
    if density is not None and path not in ("weight", "activation") and not cached:
        sc = sparse_costs(T, O, I, nr, density, density, need_x=need_x, need_S=need_S, need_W=need_W, r=r,
                          device=device, threads=threads)["total"]
        floor = _dense_floor(T, O, I, nr, fused, need_x, need_S, need_W, build, costs)
        why.append(f"sparse route (through the non-zeros, weighted, {threads} thread(s)) {sc:.3g} against the "
                   f"cheapest dense plan's {floor:.3g}: " + ("forced by path='sparse'" if path == "sparse" else
                                                            "sparse" if sc < floor else "dense"))
        if path == "sparse" or sc < floor:
            return _sparse(T, device, threads, need_x, need_S, need_W, sc, tuple(why))
    path = "auto" if path == "sparse" else path
    kept = False
    if fused and not compiling:
        if grad:  # (compared on a training call's backward: ∂λ/∂γ needed, W frozen; as keep_pays)
            kept, reason = _keep(T, O, I, nr, path, keep, need_x, True, False, cached, costs, build)
            why.append(reason)
        elif path != "activation":  # a prebuilt W + s·ΔW: the cached one, or one built cheaper than the op's route
            fc = plan(T, O, I, nr, path=path, need_x=False, need_S=False)["forward_cost"]
            kept = cached or build < fc
            why.append("prebuild W + s·ΔW: " + ("yes, from the randlora.cached s·ΔW" if cached else
                                                f"{'yes' if kept else 'no'}, by cost (building {build:.3g} against "
                                                f"the forward route's {fc:.3g})"))
    elif not fused:
        why.append("W is not handed to the op (dropout in training, or a quantised base): the adapter term alone")
    else:
        why.append("under torch.compile nothing is prebuilt")
    how = "cached" if cached else ("sparse" if sparse_build_pays(density, device) else "fresh")
    return _dense(T, O, I, nr, fused, path, need_x, need_S, need_W, kept, how if kept else None, build, tuple(why))
