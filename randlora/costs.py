"""What each route costs: the per-device constants and the multiply-add counts the planner compares.

Arithmetic only, no decision: :mod:`randlora.planner` compares these figures and decides. Each constant of
:data:`DEVICE_COSTS` says which command measured it (or how it was derived). The CPU row was measured on a
2-core CPU; the CUDA row (used for every non-CPU device) comes from arithmetic counts until a GPU run measures it
(``benchmarks/gpu_check.sh``), so no CPU-measured constant decides a CUDA route. Nothing here imports ``torch``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["DeviceCosts", "DEVICE_COSTS", "device_costs", "forward_costs", "backward_costs", "padded_width",
           "sparse_costs", "token_block"]


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
    scaled_side: float
    """The batched sparse pass of ``randlora.mixed`` computes a group's ``S`` product by scaling its ``T_g`` tokens
    around ``A`` (an ``n × m × T_g`` temporary) instead of building the adapter's ``S`` (three gathers of its
    ``n·nnz(A)`` values) when ``m·T_g < scaled_side · nnz(A)``."""
    measured_by: dict[str, str] = field(default_factory=dict, compare=False, repr=False)


DEVICE_COSTS: dict[str, DeviceCosts] = {
    "cpu": DeviceCosts(
        spmm_weight=5.0, sampled_weight=5.0, keep_memory_ratio=1.0, keep_reuse_ratio=3.0,
        token_block=64, token_block_threaded=512, scratch=True, layout_weight=130.0, layout_weight_threaded=250.0,
        gemm_tokens=40, group_overhead=8e6, build_weight=12.0, scaled_side=1.5,
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
            "scaled_side": "python benchmarks/serving.py --group-terms (single-token groups at very_sparse density "
                           "take the scaled side; docs/serving.md)",
        }),
    "cuda": DeviceCosts(
        spmm_weight=80.0, sampled_weight=8.0, keep_memory_ratio=1.0, keep_reuse_ratio=3.0,
        token_block=None, token_block_threaded=None, scratch=False, layout_weight=400.0,
        layout_weight_threaded=400.0, gemm_tokens=200, group_overhead=2e10, build_weight=80.0, scaled_side=1.5,
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
            "scaled_side": "arithmetic: both sides move about as many values as on the CPU (the temporary against "
                           "the gathers); not measured on a GPU. To measure: python benchmarks/serving.py "
                           "--group-terms --device cuda",
        }),
}


def device_costs(device_type: str) -> DeviceCosts:
    """The constants for ``device_type``: the CPU's on ``"cpu"``, the CUDA row (arithmetic counts) elsewhere."""
    return DEVICE_COSTS["cpu"] if device_type == "cpu" else DEVICE_COSTS["cuda"]


# ------------------------------------------------------------------------------------------------
# cost model (multiply-adds)
# ------------------------------------------------------------------------------------------------
def forward_costs(T: int, O: int, I: int, nr: int, with_weight: bool, kept: bool = False) -> dict[str, int]:
    """Extra multiply-adds over the frozen layer for each forward path (``kept``: ``W + s·ΔW`` prebuilt)."""
    build = 0 if kept else max(O, I) * nr * min(O, I)
    return {
        "weight": build + (0 if with_weight else T * O * I),
        "activation": T * nr * (O + I),
    }


def backward_costs(T: int, O: int, I: int, nr: int, tr: bool, with_weight: bool, need_x: bool, need_S: bool,
                   need_W: bool, kept: bool = False) -> dict[tuple[str | None, str | None], int]:
    """Extra multiply-adds over the frozen layer's backward for each (∂x route, ∂S route).

    ∂x: ``"kept"`` (``gy @ prebuilt``, free), ``"fused"`` (rebuild ``W + s·ΔW``), ``"act"`` (through the
    bases). ∂S: ``"G"`` (``B_flatᵀ (gyᵀ x)``) or ``"act"`` (``(gy B_flat)ᵀ x``; shares ``gy B_flat`` with
    the ``"act"`` ∂x route when ``I <= O``).
    """
    build = max(O, I) * nr * min(O, I)
    G = T * O * I
    if need_x:
        xr = ["kept", "act"] if kept else ["fused", "act"]
    else:
        xr = [None]
    sr = ["G", "act"] if need_S else [None]
    out = {}
    for a in xr:
        for b in sr:
            c = G if (need_W or b == "G") else 0  # gyᵀx
            if a == "fused":
                c += build + (0 if with_weight else T * O * I)
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



def token_block(device: str, threads: int) -> int | None:
    """The sparse route's token block on ``device`` with ``threads`` torch threads (None: no blocking)."""
    dc = device_costs(device)
    return dc.token_block if threads == 1 else dc.token_block_threaded

