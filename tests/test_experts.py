"""Adapted parameters (``inject(..., target_parameters=[...])``): the fused expert tensors of transformers' MoE
models (Mixtral, Qwen3-MoE, gpt-oss) and plain 2-D / 3-D parameters."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import randlora
from randlora.experts import RandLoraParameter, _AdaptedWeight
from randlora.walker import adapted_weights
from reference import reference_delta

transformers = pytest.importorskip("transformers")

IMPLS = ("eager", "batched_mm", "grouped_mm")
PARAMS = ["gate_up_proj", "down_proj"]


def _moe(family: str) -> nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=8)
    if family == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, **common)
        return transformers.MixtralForCausalLM(cfg)
    if family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(intermediate_size=24, moe_intermediate_size=12, num_experts=4,
                                          num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], **common)
        return transformers.Qwen3MoeForCausalLM(cfg)
    cfg = transformers.GptOssConfig(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                                    layer_types=["full_attention"], **common)
    model = transformers.GptOssForCausalLM(cfg)
    with torch.no_grad():  # gpt-oss initialises its experts to zero: give them values
        for n, p in model.named_parameters():
            if "experts" in n:
                p.normal_(0, 0.2)
    return model


def _randomize(model: nn.Module, name: str | None = None, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, unit in adapted_weights(model):
            ad = unit.adapter(name)
            if ad is not None:
                ad.randlora_lambda.copy_(torch.randn(ad.randlora_lambda.shape, generator=g) * 0.5)
                ad.randlora_gamma.copy_(torch.randn(ad.randlora_gamma.shape, generator=g))


def _reference_model(base: nn.Module, adapted: nn.Module) -> nn.Module:
    """``base`` with every adapted parameter's ``s·ΔW`` added per expert, from the float64 reference."""
    ref = copy.deepcopy(base)
    bank = adapted.randlora_bank
    with torch.no_grad():
        for path, unit in adapted_weights(adapted):
            if not isinstance(unit, RandLoraParameter):
                continue
            lam, gam = unit.randlora_lambda.detach(), unit.randlora_gamma.detach()
            P = ref.get_parameter(path)
            mats = P if P.dim() == 3 else P.unsqueeze(0)
            for e in range(mats.shape[0]):
                l, g = (lam[e], gam[e]) if P.dim() == 3 else (lam, gam)
                mats[e] += reference_delta(l, g, bank.A, bank.B, *mats.shape[1:], unit.scaling).float()
    return ref


IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_every_experts_implementation_matches_the_reference(family):
    base = _moe(family)
    model = copy.deepcopy(base)
    report = randlora.inject(model, target_parameters=PARAMS, r=4)
    assert report.experts == {f"model.layers.0.mlp.experts.{p}": 4 for p in PARAMS}
    _randomize(model)
    ref = _reference_model(base, model)
    grads = []
    for impl in IMPLS:
        model.config._experts_implementation = ref.config._experts_implementation = impl
        y = model(IDS).logits
        torch.testing.assert_close(y, ref(IDS).logits, atol=2e-5, rtol=1e-4)
        y.square().mean().backward()
        g = [p.grad.clone() for p in randlora.trainable_parameters(model)]
        assert len(g) == 4 and all(x.abs().sum() > 0 for x in g)  # every λ and γ gets a gradient
        grads.append(g)
        model.zero_grad()
    for g in grads[1:]:
        for a, b in zip(grads[0], g):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with randlora.disabled(model):
        torch.testing.assert_close(model(IDS).logits, base(IDS).logits)
    assert not torch.allclose(model(IDS).logits, base(IDS).logits, atol=1e-3)


def test_module_state_dict_keys_and_layout():
    base = _moe("mixtral")
    keys = set(base.state_dict())
    model = copy.deepcopy(base)
    randlora.inject(model, ["q_proj"], target_parameters=PARAMS, r=4)
    new = set(model.state_dict())
    assert keys <= new
    extra = sorted(new - keys)
    assert "model.layers.0.mlp.experts.randlora_params.gate_up_proj.randlora_lambda" in extra
    unit = model.get_submodule("model.layers.0.mlp.experts.randlora_params.gate_up_proj")
    assert tuple(unit.randlora_lambda.shape) == (4, 4, 4) and tuple(unit.randlora_gamma.shape) == (4, 4, 16)
    sd = randlora.state_dict(model, save_projection=False)
    assert tuple(sd["model.layers.0.mlp.experts.down_proj.randlora_gamma"].shape) == (4, 4, 16)
    assert "E" in randlora.summary(model) and "expert tensor" in randlora.summary(model)


def test_built_weight_is_not_kept_for_backward():
    """The graph holds no W + s·ΔW after forward: backward rebuilds it (and still gets the right gradients)."""
    model = _moe("mixtral")
    randlora.inject(model, target_parameters=PARAMS, r=4)
    _randomize(model)
    experts = model.get_submodule("model.layers.0.mlp.experts")
    for impl in IMPLS:
        model.config._experts_implementation = impl
        seen = []
        h = experts.register_forward_pre_hook(lambda m, a: seen.append(weakref.ref(m.gate_up_proj)))
        loss = model(IDS).logits.square().mean()
        h.remove()
        gc.collect()
        assert seen and not isinstance(seen[0](), nn.Parameter)
        assert seen[0]() is None, impl  # not referenced by the graph
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in randlora.trainable_parameters(model))
        assert isinstance(experts.gate_up_proj, nn.Parameter)
        model.zero_grad()


class _Stack(nn.Module):
    """A module reading one 3-D parameter per call (eager per-expert matmuls) and a 2-D one."""

    def __init__(self, E: int, a: int, b: int, dtype=torch.float32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(E, a, b, generator=g, dtype=dtype))
        self.v = nn.Parameter(torch.randn(a, b, generator=g, dtype=dtype))

    def forward(self, x):  # x (E, T, b)
        return torch.bmm(x, self.w.transpose(1, 2)) @ self.v


def _unit_delta_matches_reference(E, a, b, r, bases="dense"):
    model = _Stack(E, a, b, torch.float64)
    randlora.inject(model, target_parameters=["w", "v"], r=r, bases=bases)
    _randomize(model)
    bank = model.randlora_bank
    for _, unit in adapted_weights(model):
        D = unit.delta_weight()
        with torch.no_grad():  # what a call computes with: W + s·ΔW
            torch.testing.assert_close(unit.call_weight()[0], unit.weight + D, atol=1e-12, rtol=0)
        lam, gam = unit.randlora_lambda.detach(), unit.randlora_gamma.detach()
        if D.dim() == 2:
            D, lam, gam = D[None], lam[None], gam[None]
        for e in range(D.shape[0]):
            ref = reference_delta(lam[e], gam[e], bank.A, bank.B, D.shape[1], D.shape[2], unit.scaling)
            torch.testing.assert_close(D[e], ref, atol=1e-10, rtol=1e-9)


@settings(max_examples=12, deadline=None)
@given(E=st.integers(1, 4), a=st.integers(1, 9), b=st.integers(1, 9), r=st.integers(1, 4))
def test_delta_matches_reference_over_shapes(E, a, b, r):
    r = min(r, max(a, b))
    _unit_delta_matches_reference(E, a, b, r)


@pytest.mark.parametrize("bases", ["sparse", "very_sparse"])
@pytest.mark.parametrize("nonzeros", [True, False])
def test_ternary_bases_match_reference(bases, nonzeros, monkeypatch):
    import randlora.experts as ex

    calls = []
    monkeypatch.setattr(ex.planner, "sparse_build_pays", lambda *a: calls.append(a) or nonzeros)
    _unit_delta_matches_reference(3, 12, 7, 2, bases)
    assert calls  # the build asked the planner (through the bases' non-zeros, or the dense views)


def test_gradcheck_adapted_weight():
    model = _Stack(2, 5, 3, torch.float64)
    randlora.inject(model, target_parameters=["w"], r=2)
    unit = model.get_submodule("randlora_params.w")
    lam = torch.randn(unit.randlora_lambda.shape, dtype=torch.float64, requires_grad=True)
    gam = torch.randn(unit.randlora_gamma.shape, dtype=torch.float64, requires_grad=True)
    W = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda W, l, g: _AdaptedWeight.apply(W, l, g, unit, 0.7), (W, lam, gam))


def test_gradients_match_autograd_of_the_reference():
    model = _Stack(3, 6, 4, torch.float64)
    randlora.inject(model, target_parameters=["w", "v"], r=2)
    _randomize(model)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    model(x).square().sum().backward()
    bank, leaves, adapted = model.randlora_bank, {}, {}
    for path, unit in adapted_weights(model):
        lam = unit.randlora_lambda.detach().clone().requires_grad_(True)
        gam = unit.randlora_gamma.detach().clone().requires_grad_(True)
        l3, g3 = (lam, gam) if unit.E else (lam[None], gam[None])
        mats = torch.stack([reference_delta(l3[e], g3[e], bank.A, bank.B, *unit.weight.shape[-2:], unit.scaling)
                            for e in range(l3.shape[0])])
        adapted[path] = unit.weight.detach() + (mats if unit.E else mats[0])
        leaves[path] = (unit, lam, gam)
    (torch.bmm(x, adapted["w"].transpose(1, 2)) @ adapted["v"]).square().sum().backward()
    for unit, lam, gam in leaves.values():
        torch.testing.assert_close(unit.randlora_lambda.grad, lam.grad)
        torch.testing.assert_close(unit.randlora_gamma.grad, gam.grad)


def test_merge_unmerge_eject():
    base = _moe("gpt_oss")
    model = copy.deepcopy(base)
    randlora.inject(model, ["q_proj"], target_parameters=PARAMS, r=4)
    _randomize(model)
    y = model(IDS).logits.detach()
    randlora.merge(model, unload=False)
    torch.testing.assert_close(model(IDS).logits, y, atol=2e-5, rtol=1e-4)
    with randlora.disabled(model):
        torch.testing.assert_close(model(IDS).logits, base(IDS).logits, atol=2e-5, rtol=1e-4)
    randlora.unmerge(model)
    for k, t in base.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], t, atol=1e-6, rtol=0)
    randlora.merge(model)
    assert set(model.state_dict()) == set(base.state_dict())
    assert not model.get_submodule("model.layers.0.mlp.experts")._forward_pre_hooks
    torch.testing.assert_close(model(IDS).logits, y, atol=2e-5, rtol=1e-4)
    again = copy.deepcopy(base)
    randlora.inject(again, target_parameters=PARAMS, r=4)
    _randomize(again)
    randlora.eject(again)
    assert all(torch.equal(again.state_dict()[k], t) for k, t in base.state_dict().items())
    assert set(again.state_dict()) == set(base.state_dict())


@pytest.mark.parametrize("save_projection", [True, False])
def test_save_and_load(tmp_path, save_projection):
    base = _moe("qwen3_moe")
    model = copy.deepcopy(base)
    randlora.inject(model, ["q_proj"], target_parameters=PARAMS, r=4, seed=5)
    _randomize(model)
    y = model(IDS).logits.detach()
    path = randlora.save(model, tmp_path / "a.safetensors", save_projection=save_projection)
    fresh = copy.deepcopy(base)
    randlora.load(fresh, path)
    assert randlora.walker.config_of(fresh).target_parameters == [f"model.layers.0.mlp.experts.{p}" for p in PARAMS]
    torch.testing.assert_close(fresh(IDS).logits, y)
    inner = copy.deepcopy(base).model  # the bare MoE model: the file's paths lose their "model." prefix
    randlora.load(inner, path)
    torch.testing.assert_close(inner(IDS).last_hidden_state, model.model(IDS).last_hidden_state)
    sd = randlora.state_dict(model)
    sd["model.layers.0.mlp.experts.down_proj.randlora_lambda"] = torch.zeros(3, 4, 4)
    with pytest.raises(randlora.CheckpointError, match="down_proj.randlora_lambda"):
        randlora.load_state_dict(fresh, sd)
    torch.testing.assert_close(fresh(IDS).logits, y)  # nothing was loaded


def test_named_adapters_use_and_delete():
    base = _moe("mixtral")
    model = copy.deepcopy(base)
    randlora.inject(model, target_parameters=PARAMS, r=4)
    _randomize(model)
    y_a = model(IDS).logits.detach()
    randlora.inject(model, target_parameters=["down_proj"], r=4, name="b")
    _randomize(model, "b", seed=7)
    randlora.use(model, "b")
    y_b = model(IDS).logits.detach()
    assert not torch.allclose(y_a, y_b, atol=1e-4)
    assert tuple(randlora.state_dict(model, name="b")["model.layers.0.mlp.experts.down_proj.randlora_gamma"].shape) \
        == (4, 4, 16)
    randlora.delete(model, "default")
    assert randlora.adapter_names(model) == ["b"]
    torch.testing.assert_close(model(IDS).logits, y_b)
    assert not any("gate_up_proj.randlora" in k for k in model.state_dict())
    assert "model.layers.0.mlp.experts.randlora_params.down_proj.randlora_lambda" in model.state_dict()
    randlora.delete(model, "b")
    assert set(model.state_dict()) == set(base.state_dict())


@pytest.mark.parametrize("frozen_base", [False, True])
def test_cached_keeps_each_expert_tensor_and_follows_values(frozen_base):
    """Inside ``randlora.cached`` a no-grad call reuses each expert tensor's kept update (built once per block,
    rebuilt when λ/γ values or the adapter change); outputs match the uncached model; nothing is written."""
    model = _moe("mixtral")
    randlora.inject(model, ["q_proj"], target_parameters=PARAMS, r=4)
    _randomize(model)
    units = [u for _, u in adapted_weights(model) if isinstance(u, RandLoraParameter)]
    before = {k: t.clone() for k, t in model.state_dict().items()}
    with torch.no_grad():
        want = model(IDS).logits
        with randlora.cached(model, frozen_base=frozen_base) as names:
            assert [n for n in names if "experts" in n] == [f"model.layers.0.mlp.experts.{p}" for p in PARAMS]
            y = model(IDS).logits
            torch.testing.assert_close(y, want, atol=2e-5, rtol=1e-4)
            assert torch.equal(model(IDS).logits, y) and all(u.cache.builds == 1 for u in units)
            assert "randlora.cached: 3 layers keep" in randlora.summary(model)  # q_proj and the two tensors
            units[1].randlora_gamma.data.mul_(1.5)  # no version bump: seen by value
            moved = model(IDS).logits
            assert units[1].cache.builds == 2 and units[0].cache.builds == 1
        torch.testing.assert_close(moved, model(IDS).logits, atol=2e-5, rtol=1e-4)
        with randlora.cached(model, max_bytes=0) as names:
            assert names == [] and all(u.cache is None for u in units)
    assert all(u.cache is None for u in units)
    assert all(torch.equal(model.state_dict()[k], t) for k, t in before.items() if "gamma" not in k)


def _refused(model, exc, match, fn):
    before = {k: t.clone() for k, t in model.state_dict().items()}
    with pytest.raises(exc, match=match) as info:
        fn()
    assert len(str(info.value)) <= 1500
    assert set(model.state_dict()) == set(before) and all(torch.equal(model.state_dict()[k], t)
                                                           for k, t in before.items())


def test_refusals_leave_the_model_unchanged():
    model = _moe("mixtral")
    _refused(model, randlora.TargetError, r"target_parameters=\['gate_up_proj', 'down_proj'\].*", 
             lambda: randlora.inject(model, ["experts"]))
    _refused(model, randlora.TargetError, "match no parameter", lambda: randlora.inject(model, target_parameters=["x"]))
    _refused(model, randlora.TargetError, "2-D matrices", lambda: randlora.inject(model, target_parameters=["norm.weight"]))
    _refused(model, randlora.ConfigError, "dropout", lambda: randlora.inject(model, target_parameters=PARAMS, dropout=0.1))
    _refused(model, randlora.TargetError, "nothing to adapt", lambda: randlora.inject(model))
    assert randlora.walker.bank_of(model) is None
    randlora.inject(model, target_parameters=PARAMS, r=4)
    _refused(model, randlora.StateError, "save_peft", lambda: randlora.save_peft(model, "/nonexistent/x"))
    randlora.inject(model, target_parameters=PARAMS, r=4, name="b")
    with pytest.raises(randlora.StateError, match="mixed"):
        with randlora.mixed(model, ["default", "b"]):
            model(IDS)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = _moe("mixtral")
    randlora.inject(model, target_parameters=PARAMS, r=4)
    _randomize(model)
    model.train()
    model(IDS, labels=IDS).loss.backward()
    plain = [p.grad.clone() for p in randlora.trainable_parameters(model)]
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model(IDS, labels=IDS).loss.backward()
    for a, p in zip(plain, randlora.trainable_parameters(model)):
        torch.testing.assert_close(p.grad, a)


def test_bf16_call_weight_equals_the_merged_weight():
    model = _moe("qwen3_moe").to(torch.bfloat16)
    randlora.inject(model, target_parameters=PARAMS, r=4)
    _randomize(model)
    units = [u for _, u in adapted_weights(model)]
    assert units[0].randlora_lambda.dtype == torch.float32
    with torch.no_grad():
        called = [u.call_weight()[0].clone() for u in units]
    randlora.merge(model, unload=False)
    for u, w in zip(units, called):
        assert w.dtype == torch.bfloat16 and torch.equal(u.weight, w)


def test_cli_merge_into_a_weight_file(tmp_path):
    from safetensors.torch import load_file, save_file

    from randlora.__main__ import merge_file
    from randlora.export import export_file

    base = _moe("gpt_oss")
    save_file({k: t.contiguous() for k, t in base.state_dict().items()}, tmp_path / "base.safetensors")
    model = copy.deepcopy(base)
    randlora.inject(model, ["q_proj"], target_parameters=PARAMS, r=4)
    _randomize(model)
    randlora.save(model, tmp_path / "a.safetensors", save_projection=False)
    summary = merge_file(tmp_path / "base.safetensors", tmp_path / "a.safetensors", tmp_path / "merged.safetensors")
    assert summary["layers"] == 3
    randlora.merge(model)
    merged = load_file(tmp_path / "merged.safetensors")
    for k, t in model.state_dict().items():
        torch.testing.assert_close(merged[k], t, atol=1e-6, rtol=0)
    assert not torch.equal(merged["model.layers.0.mlp.experts.down_proj"], base.state_dict()[
        "model.layers.0.mlp.experts.down_proj"])
    with pytest.raises(randlora.CheckpointError, match="3-D parameters"):
        export_file(tmp_path / "a.safetensors", tmp_path / "base.safetensors", tmp_path / "lora")


def test_trainer_checkpoint_resumes_exactly(tmp_path):
    from randlora.hf import ADAPTER_FILE, trainer_class
    from stop_at import StopAt

    g = torch.Generator().manual_seed(0)
    ids = (torch.randint(0, 64, (16, 1), generator=g) + torch.arange(8)) % 64
    data = [{"input_ids": x, "labels": x.clone()} for x in ids]

    def run(out, resume=None, callbacks=None):
        model = _moe("mixtral")
        randlora.inject(model, ["q_proj"], target_parameters=PARAMS, r=4)
        args = transformers.TrainingArguments(output_dir=str(out), max_steps=2, per_device_train_batch_size=4,
                                              learning_rate=3e-2, save_strategy="steps", save_steps=1, use_cpu=True,
                                              report_to=[], seed=0, disable_tqdm=True, remove_unused_columns=False)
        trainer_class()(model=model, args=args, train_dataset=data, callbacks=callbacks).train(
            resume_from_checkpoint=resume)
        return {k: t for k, t in randlora.state_dict(model, save_projection=False).items() if "gamma" in k}

    want = run(tmp_path / "a")
    run(tmp_path / "b", callbacks=[StopAt(1)])
    ck = tmp_path / "b" / "checkpoint-1"
    assert "model.layers.0.mlp.experts.gate_up_proj.randlora_gamma" in randlora.checkpoint.read_file(ck / ADAPTER_FILE)[0]
    got = run(tmp_path / "b", resume=str(ck))
    assert set(got) == set(want) and all(torch.allclose(got[k], want[k], atol=1e-6, rtol=0) for k in want)


@pytest.mark.parametrize("family,targets", [("mixtral", None), ("gpt_oss", ["q_proj"])])
def test_save_lora_loads_in_peft(tmp_path, family, targets):
    peft = pytest.importorskip("peft")
    base = _moe(family)
    model = copy.deepcopy(base)
    randlora.inject(model, targets, target_parameters=PARAMS, r=4)
    _randomize(model)
    y = model(IDS).logits.detach()
    export = randlora.save_lora(model, tmp_path / "lora", rank="full")
    assert export.max_error < 1e-5 and "model.layers.0.mlp.experts.down_proj" in repr(export)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora"))
    torch.testing.assert_close(loaded(IDS).logits, y, atol=1e-5, rtol=1e-4)
    low = randlora.to_lora(model, rank=2)
    assert set(low.ranks.values()) == {2} and 0 < low.max_error < 1


def test_chunked_build_and_gradients_equal_the_whole(monkeypatch):
    import randlora.experts as ex

    model = _Stack(5, 6, 4, torch.float64)
    randlora.inject(model, target_parameters=["w"], r=2)
    _randomize(model)
    unit = model.get_submodule("randlora_params.w")
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    whole = unit.delta_weight()
    model(x).square().sum().backward()
    grads = [unit.randlora_lambda.grad.clone(), unit.randlora_gamma.grad.clone()]
    model.zero_grad()
    monkeypatch.setattr(ex, "_CHUNK", 30)  # one expert (24 elements) per step
    assert len(ex._chunks(5, 24)) == 5
    torch.testing.assert_close(unit.delta_weight(), whole, atol=1e-12, rtol=0)
    model(x).square().sum().backward()
    torch.testing.assert_close(unit.randlora_lambda.grad, grads[0])
    torch.testing.assert_close(unit.randlora_gamma.grad, grads[1])


# ------------------------------------------------------------------------------------------------
# FSDP2, two processes on CPU (the workers live in a light module: spawn imports it in each process)
# ------------------------------------------------------------------------------------------------
def test_fsdp2_two_processes_give_the_single_process_gradients(tmp_path, spawn_two):
    from _experts_worker import X, fsdp_model, fsdp_worker

    spawn_two(fsdp_worker, str(tmp_path))
    ref = fsdp_model()
    ref(X).square().sum().backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    sd = randlora.state_dict(ref, save_projection=False)
    assert len(grads) == 8  # λ, γ of both expert tensors and both linear layers
    for rank in range(2):
        for got, got_sd, kind in torch.load(tmp_path / f"rank{rank}.pt", weights_only=False):
            assert kind == "DTensor" and got.keys() == grads.keys()
            for k in grads:
                torch.testing.assert_close(got[k], grads[k], atol=1e-6, rtol=1e-5)
            assert all(torch.equal(got_sd[k], sd[k]) for k in sd)
