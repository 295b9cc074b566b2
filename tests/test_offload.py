"""Models dispatched by accelerate: a tiny Llama saved, then reloaded with a device_map that offloads layers to
disk, with ``device_map="auto"`` and a CPU memory limit, or wrapped by ``cpu_offload`` / ``disk_offload``. The
adapted model computes what the same model in memory computes (outputs, gradients, a training step, disabled),
saves and loads adapters both ways, keeps no brought-in weight alive after a layer's forward, merges into
accelerate's stored copies (refused, naming the command-line merge, where they are the checkpoint's own file) and
ejects back to accelerate's own layers."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
import transformers
from accelerate import cpu_offload, disk_offload

import randlora
from randlora.errors import ConfigError, StateError
from randlora.layer import RandLoraLinear
from randlora.offload import Onload

TARGETS = ["q_proj", "v_proj", "down_proj"]
DISK = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
        "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
KINDS = ["device_map", "auto", "cpu_offload"]  # (disk_offload: in the tests of backward's refetch and of load_peft)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.LlamaForCausalLM(cfg).save_pretrained(d / "model")
    return d


def load(saved, kind, tmp_path):
    """The saved Llama in memory (``kind`` None) or dispatched by accelerate as ``kind`` says."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "device_map":
            return transformers.LlamaForCausalLM.from_pretrained(saved / "model", device_map=DISK,
                                                                 offload_folder=tmp_path / "off").eval()
        if kind == "auto":  # accelerate places what does not fit max_memory on disk
            m = transformers.LlamaForCausalLM.from_pretrained(saved / "model", device_map="auto",
                                                              max_memory={"cpu": "40KB"},
                                                              offload_folder=tmp_path / "off").eval()
            assert "disk" in set(m.hf_device_map.values())
            return m
        m = transformers.LlamaForCausalLM.from_pretrained(saved / "model").eval()
    if kind == "cpu_offload":
        return cpu_offload(m, execution_device="cpu")
    if kind == "disk_offload":
        return disk_offload(m, tmp_path / "disk", execution_device="cpu")
    return m


def adapted(model, seed=3, **kw):
    randlora.inject(model, TARGETS, r=4, alpha=8, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def offloaded_layers(model):
    return [l for l in model.modules() if isinstance(l, RandLoraLinear) and isinstance(l.forward, Onload)
            and l.forward.names]


X = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))


def loss_and_grads(model):
    model.zero_grad()
    y = model(X).logits
    y.square().mean().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_gradients_and_a_step_equal_the_model_in_memory(saved, tmp_path, kind):
    ref, model = adapted(load(saved, None, tmp_path)), adapted(load(saved, kind, tmp_path))
    off = offloaded_layers(model)
    assert off and all(l.weight.is_meta and l.randlora_lambda.device.type == "cpu" for l in off)
    y0, g0 = loss_and_grads(ref)
    y, g = loss_and_grads(model)
    torch.testing.assert_close(y, y0, atol=1e-5, rtol=0)
    assert set(g) == set(g0) and len(g) == 2 * 9
    for n in g0:
        assert g[n].abs().sum() > 0, n  # every adapted weight gets a gradient
        torch.testing.assert_close(g[n], g0[n], atol=1e-5, rtol=0)
    assert all(l.weight.is_meta for l in off)  # sent back after the call
    for m in (ref, model):  # one step each
        torch.optim.SGD(randlora.trainable_parameters(m), lr=0.5).step()
    with torch.no_grad():
        after = model(X).logits
        torch.testing.assert_close(after, ref(X).logits, atol=1e-5, rtol=0)
        assert (after - y).abs().max() > 1e-3  # the step changed the output
        with randlora.disabled(model), randlora.disabled(ref):
            torch.testing.assert_close(model(X).logits, ref(X).logits, atol=1e-5, rtol=0)
    for k, v in randlora.state_dict(ref).items():
        torch.testing.assert_close(randlora.state_dict(model)[k], v, atol=1e-5, rtol=0)


def test_no_brought_in_weight_outlives_the_forward(saved, tmp_path, monkeypatch):
    """Backward fetches an offloaded weight again instead of keeping the copy the forward brought in."""
    model = adapted(load(saved, "disk_offload", tmp_path))
    ref = adapted(load(saved, None, tmp_path))
    seen, forward = [], RandLoraLinear.forward

    def spy(self, x):
        seen.append(weakref.ref(self.weight))
        return forward(self, x)

    monkeypatch.setattr(RandLoraLinear, "forward", spy)
    model.train()
    y = model(X).logits
    monkeypatch.undo()
    gc.collect()
    assert len(seen) == 9 and all(r() is None for r in seen)
    y.square().mean().backward()
    _, g0 = loss_and_grads(ref)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, g0[n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("with_bases", [True, False])
def test_adapters_move_between_offloaded_and_in_memory_models(saved, tmp_path, with_bases):
    ref = adapted(load(saved, None, tmp_path))
    with torch.no_grad():
        want = ref(X).logits
    model = adapted(load(saved, "device_map", tmp_path), seed=9)
    randlora.save(model, tmp_path / "off.safetensors", save_projection=with_bases)
    randlora.save(ref, tmp_path / "mem.safetensors", save_projection=with_bases)
    fresh = load(saved, "disk_offload", tmp_path)
    randlora.load(fresh, tmp_path / "mem.safetensors")  # into an offloaded model: no meta-tensor error
    back = load(saved, None, tmp_path)
    randlora.load(back, tmp_path / "off.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(X).logits, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(back(X).logits, model(X).logits, atol=1e-5, rtol=0)


def test_a_peft_folder_loads_into_an_offloaded_model(saved, tmp_path):
    ref = adapted(load(saved, None, tmp_path), recipe="peft")
    randlora.save_peft(ref, tmp_path / "peft")
    model = load(saved, "disk_offload", tmp_path)
    randlora.load_peft(model, tmp_path / "peft")
    assert offloaded_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(X).logits, ref(X).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["device_map", "cpu_offload"])  # (an offload-folder file; CPU memory)
def test_merge_writes_back_through_the_offload(saved, tmp_path, kind):
    """merge folds s·ΔW into accelerate's stored copy (CPU memory, or its offload folder; never the checkpoint's
    file) exactly as the in-memory merge does; unmerge, disabled and merge(unload=True) work on it."""
    checkpoint = (saved / "model" / "model.safetensors").read_bytes()
    ref, model, base = adapted(load(saved, None, tmp_path)), adapted(load(saved, kind, tmp_path)), load(saved, None,
                                                                                                       tmp_path)
    with torch.no_grad():
        y_adapted, y_base = ref(X).logits, base(X).logits
        randlora.merge(ref)
        y_merged = ref(X).logits
        randlora.merge(model, unload=False)
        assert all(l.weight.is_meta for l in offloaded_layers(model))
        assert torch.equal(model(X).logits, y_merged)  # the same bits as the in-memory merge
        with randlora.disabled(model):
            torch.testing.assert_close(model(X).logits, y_base, atol=1e-5, rtol=0)
        randlora.unmerge(model)
        torch.testing.assert_close(model(X).logits, y_adapted, atol=1e-5, rtol=0)
        randlora.merge(model, safe=True)
        q = model.model.layers[2].self_attn.q_proj
        assert type(q) is torch.nn.Linear and q.weight.is_meta and q._hf_hook.offload  # accelerate's layer again
        assert torch.equal(model(X).logits, y_merged)
    assert (saved / "model" / "model.safetensors").read_bytes() == checkpoint


def test_merge_is_refused_where_the_weight_cannot_be_written_and_eject_restores(saved, tmp_path):
    """Disk offload read from the checkpoint's own file with no offload folder: refused, naming the CLI merge."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM.from_pretrained(saved / "model", device_map=DISK).eval()
    model, base = adapted(model), load(saved, None, tmp_path)
    with torch.no_grad():
        before = model(X).logits
        with pytest.raises(StateError, match=r"^the weights of 6 adapted layers .* offloaded by accelerate and read "
                                             r"from the checkpoint's own files.*nothing was merged.*python -m "
                                             r"randlora merge"):
            randlora.merge(model)
        assert torch.equal(model(X).logits, before)  # nothing changed
        randlora.eject(model)
        assert not any(isinstance(m, RandLoraLinear) for m in model.modules())
        q = model.model.layers[1].self_attn.q_proj
        assert q.weight.is_meta and q._hf_hook.offload  # accelerate's layer, hook and all
        torch.testing.assert_close(model(X).logits, base(X).logits, atol=1e-5, rtol=0)


def test_named_adapters_use_and_mixed(saved, tmp_path):
    model, ref = adapted(load(saved, "cpu_offload", tmp_path)), adapted(load(saved, None, tmp_path))
    for m in (model, ref):
        randlora.inject(m, TARGETS, r=4, alpha=8, name="other")
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "randlora_extra.other" in n:
                    p.normal_(generator=torch.Generator().manual_seed(len(n)))
        randlora.use(m, "other")
    with torch.no_grad():
        torch.testing.assert_close(model(X).logits, ref(X).logits, atol=1e-5, rtol=0)
        with randlora.mixed(model, ["default", None]), randlora.mixed(ref, ["default", None]):
            got, want = model(X).logits, ref(X).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        randlora.use(ref, "default")
        torch.testing.assert_close(got[0], ref(X).logits[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw, cause", [({"bias": "randlora_only"}, "bias='randlora_only' trains biases"),
                                       ({"bias": "all"}, "bias='all' trains biases")])
def test_what_cannot_work_offloaded_is_refused(saved, tmp_path, kw, cause):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    model = cpu_offload(transformers.LlamaForCausalLM(cfg).eval(), execution_device="cpu")
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(ConfigError, match=cause) as e:
        randlora.inject(model, TARGETS, r=4, **kw)
    assert "nothing was changed" in str(e.value) and "Pass bias='none'" in str(e.value)
    assert [n for n, _ in model.named_modules()] == names and not hasattr(model, "randlora_A")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="layers across two devices need a GPU beside the CPU")
def test_layers_across_two_devices(saved, tmp_path):
    """Block 0 computes on the GPU, block 1 on the CPU, block 2 on the CPU from disk (main device the CPU)."""
    from accelerate import dispatch_model

    dm = {"model.embed_tokens": "cpu", "model.layers.0": 0, "model.layers.1": "cpu", "model.layers.2": "disk",
          "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = dispatch_model(load(saved, None, tmp_path), dm, main_device="cpu", offload_dir=tmp_path / "off")
    model, ref = adapted(model), adapted(load(saved, None, tmp_path))
    lams = {n: p.device.type for n, p in model.named_parameters() if n.endswith("randlora_lambda")}
    assert {t for n, t in lams.items() if ".layers.0." in n} == {"cuda"}
    assert {t for n, t in lams.items() if ".layers.0." not in n} == {"cpu"}
    y0, g0 = loss_and_grads(ref)
    y, g = loss_and_grads(model)
    torch.testing.assert_close(y.cpu(), y0, atol=1e-5, rtol=0)
    for n in g0:
        torch.testing.assert_close(g[n].cpu(), g0[n], atol=1e-5, rtol=0)
    bank = model.randlora_bank
    assert bank.A.device.type == "cuda" and list(bank._device_copies) == [torch.device("cpu")]
    with torch.no_grad():  # every layer merges where it computes or is kept
        randlora.merge(ref)
        randlora.merge(model)
        torch.testing.assert_close(model(X).logits.cpu(), ref(X).logits, atol=1e-5, rtol=0)


def test_an_adapter_with_bases_loads_into_a_model_on_the_meta_device(tmp_path):
    """Its bases are the seed's (checked by their checksum), which the bank makes after ``to_empty``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    randlora.inject(model, ["0", "1"], r=2)
    with torch.no_grad():
        for p in randlora.trainable_parameters(model):
            p.normal_(generator=torch.Generator().manual_seed(p.numel()))
    randlora.save(model, tmp_path / "ad.safetensors", save_projection=True)
    with torch.device("meta"):
        meta = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    randlora.load(meta, tmp_path / "ad.safetensors")  # no NotImplementedError on meta tensors
    meta.to_empty(device="cpu")
    meta.load_state_dict(base, strict=False)
    randlora.load(meta, tmp_path / "ad.safetensors")
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(meta(x), model(x))
