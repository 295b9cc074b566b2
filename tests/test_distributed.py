"""Two-process CPU (gloo) runs: DistributedDataParallel and FSDP2 (``fully_shard``) on an adapted model.

Each test spawns two worker processes (``torch.multiprocessing``, spawn) that rendezvous through a file,
train on their half of a global batch and write their results to files; the parent compares them with a
single-process run on the whole batch. Workers are killed if they outlive the time limit.
"""

from __future__ import annotations

import copy
import os
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import randlora
from randlora.walker import adapted_layers, bank_of

from models import TARGETS, Net

WORLD = 2
TIMEOUT_S = 120
STEPS, LR = 2, 1e-3


def build() -> nn.Module:
    """The same adapted model in every process: seeded weights, seeded bank, random (seeded) λ/γ.

    In float64: the runs sum the same terms in another order (halves, then the all-reduce), and in float32
    one λ gradient entry with cancellation differed by 1.1e-5 of its tensor's largest entry on this machine's
    BLAS (with the library of the previous release too); float64 keeps the comparison about what DDP/FSDP
    reduce, not about float32 rounding."""
    torch.manual_seed(0)
    model = Net().double()
    randlora.inject(model, TARGETS, r=4, seed=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.randlora_lambda.copy_(torch.randn(layer.randlora_lambda.shape, generator=g) / layer.scaling)
            layer.randlora_gamma.copy_(torch.randn(layer.randlora_gamma.shape, generator=g) / layer.m)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return (torch.randn(8, 3, 12, generator=g, dtype=torch.float64),
            torch.randn(8, 3, 5, generator=g, dtype=torch.float64))


def train(model: nn.Module, x: torch.Tensor, t: torch.Tensor, params) -> dict[str, torch.Tensor]:
    """``STEPS`` SGD steps on the mean squared error; returns the first step's adapter gradients."""
    opt = torch.optim.SGD(params, lr=LR)
    first = {}
    for step in range(STEPS):
        opt.zero_grad()
        (model(x) - t).square().mean().backward()
        if step == 0:
            first = {n: _full(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
    return first


def assert_close_normwise(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    """``max|a - b| <= tol · max|b|``: the two runs sum the same terms in another order (halves, then the
    all-reduce), and λ/γ gradients are reductions with cancellation, so entries are compared to the
    tensor's size rather than each to itself."""
    assert a.shape == b.shape, what
    assert (a - b).abs().max() <= tol * b.abs().max(), f"{what}: {(a - b).abs().max()} vs {b.abs().max()}"


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _strip(name: str) -> str:
    return name.removeprefix("module.")


def single_process_reference():
    model = build()
    x, t = batch()
    grads = train(model, x, t, randlora.trainable_parameters(model))
    return model, grads


# ------------------------------------------------------------------------------------------------
# workers (top-level so that spawn can pickle them)
# ------------------------------------------------------------------------------------------------
def _worker(rank: int, kind: str, tmp: str) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
        out = {"ddp": _ddp, "fsdp": _fsdp}[kind](rank, Path(tmp))
        torch.save(out, Path(tmp) / f"rank{rank}.pt")
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        (Path(tmp) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def _ddp(rank: int, tmp: Path) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = build()
    ddp = DDP(model)
    x, t = batch()
    half = slice(rank * 4, rank * 4 + 4)
    grads = train(ddp, x[half], t[half], randlora.trainable_parameters(model))
    return {
        "grads": {_strip(k): v for k, v in grads.items()},
        "adapter": randlora.state_dict(model, save_projection=False),
        "ignored": sorted(ddp.parameters_to_ignore),
        "reduced": sorted(_strip(n) for n, p in ddp.named_parameters() if p.requires_grad),
    }


def _fsdp(rank: int, tmp: Path) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = build()
    mesh = init_device_mesh("cpu", (WORLD,))
    for blk in model.layers:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    bank = bank_of(model)
    layer = model.layers[0].up_proj
    sharded = isinstance(layer.randlora_lambda, DTensor) and isinstance(layer.weight, DTensor)
    bases_plain = not isinstance(model.randlora_A, DTensor) and not isinstance(bank.B, DTensor)
    # the only bases-sized tensors: the root's two buffers, whole on every rank
    big = [n for n, b in model.named_buffers() if b.numel() >= bank.A.numel()]
    kept_whole = [n for n, l in adapted_layers(model) if l.base_layer.weight is not None]
    roots = {model.randlora_A.untyped_storage().data_ptr(), model.randlora_B.untyped_storage().data_ptr()}
    views_shared = all({v.untyped_storage().data_ptr() for v in l.views()} == roots for _, l in adapted_layers(model))
    x, t = batch()
    half = slice(rank * 4, rank * 4 + 4)
    grads = train(model, x[half], t[half], randlora.trainable_parameters(model))
    sd = randlora.state_dict(model, save_projection=False)  # gathers (every rank calls it)
    randlora.save(model, tmp / "adapter.safetensors", save_projection=False)  # every rank: atomic, same bytes
    # load a gathered state dict back into the sharded model: each rank keeps its own shard
    shifted = {k: (v + 1 if v.is_floating_point() else v) for k, v in sd.items()}
    randlora.load_state_dict(model, shifted)
    back = randlora.state_dict(model, save_projection=False)
    lam = layer.randlora_lambda
    return {
        "grads": grads,
        "adapter": sd,
        "reloaded_ok": all(torch.equal(back[k], shifted[k]) for k in sd),
        "local_shape": tuple(lam.to_local().shape),
        "global_shape": tuple(lam.shape),
        "sharded": sharded,
        "bases_plain": bases_plain,
        "big_buffers": big,
        "kept_whole": kept_whole,
        "views_shared": views_shared,
        "A": bank.A.clone(),
    }


def run_workers(kind: str, tmp: Path) -> list[dict]:
    ctx = mp.start_processes(_worker, args=(kind, str(tmp)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{kind} workers did not finish in {TIMEOUT_S} s")
    except mp.ProcessRaisedException:
        errs = [p.read_text() for p in sorted(tmp.glob("rank*.err"))]
        pytest.fail(f"{kind} worker failed:\n" + "\n".join(errs))
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(5)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")


# ------------------------------------------------------------------------------------------------
@needs_gloo
def test_ddp_adapter_grads_equal_a_single_process_run(tmp_path):
    ranks = run_workers("ddp", tmp_path)
    ref_model, ref_grads = single_process_reference()
    ref_adapter = randlora.state_dict(ref_model, save_projection=False)
    init = randlora.state_dict(build(), save_projection=False)
    assert len(ref_grads) == 12
    for out in ranks:
        assert out["grads"].keys() == ref_grads.keys()
        for k in ref_grads:  # the all-reduced mean over two halves equals the whole-batch gradient
            assert_close_normwise(out["grads"][k], ref_grads[k], k)
        for k in ref_adapter:  # and so do the adapters after the optimizer steps
            assert_close_normwise(out["adapter"][k] - init[k], ref_adapter[k] - init[k], k)  # the SGD updates
        # only λ/γ are reduced; the bank is not broadcast (every rank makes it from the seed)
        assert out["reduced"] == sorted(ref_grads)
        assert out["ignored"] == ["randlora_A", "randlora_B"]


def _fsdp2_on_cpu() -> str | None:
    """Why FSDP2 cannot run here, or None."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        from torch.distributed.tensor import DTensor  # noqa: F401
    except ImportError as e:
        return f"this torch has no FSDP2 (torch.distributed.fsdp.fully_shard): {e}"
    return None


@needs_gloo
@pytest.mark.skipif(_fsdp2_on_cpu() is not None, reason=str(_fsdp2_on_cpu()))
def test_fsdp2_shards_the_adapter_not_the_bases_and_its_state_dict_round_trips(tmp_path):
    ranks = run_workers("fsdp", tmp_path)
    ref_model, ref_grads = single_process_reference()
    ref_adapter = randlora.state_dict(ref_model, save_projection=False)
    init = randlora.state_dict(build(), save_projection=False)
    bank = bank_of(ref_model)
    for out in ranks:
        assert out["sharded"], "fully_shard did not shard the adapted layers' parameters"
        lam = ref_model.layers[0].up_proj.randlora_lambda
        assert out["global_shape"] == tuple(lam.shape) and out["local_shape"][0] == -(-lam.shape[0] // WORLD)
        # bases: whole, plain tensors on every rank, once (not sharded, not copied per layer)
        assert out["bases_plain"] and out["big_buffers"] == ["randlora_A", "randlora_B"]
        assert torch.equal(out["A"], bank.A)
        assert out["views_shared"], "a layer reads bases that are not views of the root's buffers"
        assert out["kept_whole"] == [], "an adapted layer keeps an unsharded copy of its weight"
        assert set(ref_grads) <= set(out["grads"])
        for k in ref_grads:
            assert_close_normwise(out["grads"][k], ref_grads[k], k)
        assert out["adapter"].keys() == ref_adapter.keys()
        for k in ref_adapter:
            assert type(out["adapter"][k]) is torch.Tensor  # gathered: plain tensors
            assert_close_normwise(out["adapter"][k] - init[k], ref_adapter[k] - init[k], k)  # the SGD updates
        assert out["reloaded_ok"]
    # the file written from the sharded model loads into a plain model and reproduces the reference
    x, _ = batch()
    plain = Net().double()
    plain.load_state_dict({k: v for k, v in ref_model.state_dict().items() if "randlora" not in k}, strict=False)
    randlora.load(plain, tmp_path / "adapter.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(plain(x), ref_model(x), rtol=1e-5, atol=1e-6)
