"""One rank of a multi-process RandLoraTrainer run (launched by tests/test_trainer_engines.py).

Usage: ``python tests/_engine_worker.py ENGINE OUT`` with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` set, ENGINE one of ``ddp``, ``fsdp2``, ``zero2``, ``zero3`` (or ``one``,
without those variables: one process). ``RANDLORA_TEST_DEVICE=cuda`` trains on the GPU. The adapter
is injected into ``model.model`` (the LlamaModel inside LlamaForCausalLM), not into the model the Trainer
gets. Four runs, each on a fresh model: ``a`` uninterrupted (6 steps), ``b`` stopped after the step-4
checkpoint, ``c`` resumed from ``b/checkpoint-4``, ``d`` with ``load_best_model_at_end``. Rank 0 writes
``OUT/result.pt``; a failing rank writes its traceback to ``OUT/rank<r>.err``.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from pathlib import Path

ENGINE, OUT, RANK = "", Path("."), 0  # set by main()
DEVICE = os.environ.get("RANDLORA_TEST_DEVICE", "cpu")
VOCAB, MAX_STEPS = 256, 6
TARGETS = ["q_proj", "v_proj", "down_proj"]
PROBE_SEED = 3  # the input ids whose logits the final model reports


def base_model():
    """The plain model, the same weights in every process."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=VOCAB, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def probe_ids():
    import torch

    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(PROBE_SEED))


def tiny_model():
    import randlora

    model = base_model()
    randlora.inject(model.model, TARGETS, r=8, alpha=16, dropout=0.1)  # a submodule, not the Trainer's model
    model.lm_head.requires_grad_(False)  # outside the injected submodule: inject left it trainable
    if trains_extra(ENGINE):
        model.model.norm.weight.requires_grad_(True)  # trained beside the adapter: checkpoints hold it in EXTRA_FILE
    return model


EXTRA = "model.norm.weight"  # the parameter trained outside the adapter (its path in the Trainer's model)


def trains_extra(engine: str) -> bool:
    """Whether the run also trains ``EXTRA``. Not under FSDP2 on the CPU: there the optimiser-state writer
    (accelerate's save_fsdp_optimizer -> torch's get_optimizer_state_dict) fails with a KeyError on that
    parameter (docs/trainer.md; not investigated further)."""
    return engine != "fsdp2"


def data(n, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(0, VOCAB, (n, 1), generator=g) + torch.arange(8)) % VOCAB
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def trainer_type():
    from randlora.hf import RandLoraTrainer

    if ENGINE != "fsdp2" or DEVICE != "cpu":
        return RandLoraTrainer

    class CpuFsdp2(RandLoraTrainer):
        """accelerate 1.15 turns FSDP on only for GPU-type runs (AcceleratorState leaves MULTI_CPU as it is,
        so ``fsdp=`` arguments are ignored on a CPU). This puts accelerate's state where a GPU run has it
        (distributed type FSDP, the FSDP2 plugin), so Trainer and accelerate take their FSDP2 paths on gloo."""

        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            from accelerate.state import PartialState
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            state = self.accelerator.state
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            state.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.is_fsdp_enabled = True

    return CpuFsdp2


def engine_args():
    if ENGINE == "fsdp2":
        return {"fsdp": "full_shard",
                "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
    if ENGINE.startswith("zero"):
        return {"deepspeed": {"zero_optimization": {"stage": int(ENGINE[-1])}, "train_micro_batch_size_per_gpu": "auto",
                              "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
                              "gradient_clipping": "auto"}}
    return {}


def make_trainer(model, out, callbacks=(), compute_metrics=None, **kw):
    import transformers

    base = dict(output_dir=str(out), max_steps=MAX_STEPS, per_device_train_batch_size=2, learning_rate=3e-2,
                save_strategy="steps", save_steps=2, logging_steps=1, use_cpu=DEVICE == "cpu", report_to=[], seed=0,
                disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, warmup_steps=2)
    base.update(engine_args())
    base.update(kw)
    args = transformers.TrainingArguments(**base)
    return trainer_type()(model=model, args=args, train_dataset=data(24, 0), eval_dataset=data(8, 1),
                          callbacks=list(callbacks), compute_metrics=compute_metrics)


def adapter_state(model):
    """The adapter's λ/γ, whole, on every rank (gathered from FSDP2 shards or ZeRO-3 partitions)."""
    import contextlib

    import randlora
    from randlora.paths import locate

    root = locate(model)[1]
    extra = model.get_parameter(EXTRA) if trains_extra(ENGINE) else None
    params = [p for n, p in root.named_parameters() if "randlora_" in n] + [extra] * (extra is not None)
    ctx = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(params)
    with ctx:
        sd = randlora.state_dict(root, save_projection=False)
        out = {k: v.detach().to("cpu").clone() for k, v in sd.items() if k != "randlora_fingerprint"}
        if extra is not None:
            out[EXTRA] = extra.detach().to("cpu").clone()
        return out


def main() -> None:
    global ENGINE, OUT, RANK
    ENGINE, OUT, RANK = sys.argv[1], Path(sys.argv[2]), int(os.environ.get("RANK", "0"))
    import torch
    import transformers

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    if ENGINE.startswith("zero"):
        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce when it starts (about 40 s on two
        # cores, and a C++ toolchain); without it DeepSpeed uses torch.distributed (gloo), as it does wherever
        # that op cannot be built. The engine under test is the same.
        import importlib

        # the module itself: the attribute deepspeed.comm.torch is the torch package (deepspeed.comm imports it)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

    from stop_at import StopAt

    res: dict = {}
    model = tiny_model()
    t = make_trainer(model, OUT / "a")
    t.train()
    res["straight"] = adapter_state(model)
    lam = model.model.layers[0].self_attn.q_proj.randlora_lambda
    stage = t.accelerator.state.deepspeed_plugin.zero_stage if t.is_deepspeed_enabled else None
    res["engine"] = {"fsdp": bool(t.is_fsdp_enabled), "deepspeed": bool(t.is_deepspeed_enabled), "zero_stage": stage,
                     "dtensor": type(lam).__name__ == "DTensor", "ds_partitioned": hasattr(lam, "ds_id"),
                     "ddp": type(t.model_wrapped).__name__ == "DistributedDataParallel",
                     "world": t.args.world_size}

    model = tiny_model()
    make_trainer(model, OUT / "b", callbacks=[StopAt(4)]).train()
    res["at4"] = adapter_state(model)

    model = tiny_model()
    t = make_trainer(model, OUT / "b")
    t.train(resume_from_checkpoint=str(OUT / "b" / "checkpoint-4"))
    res["resumed"] = adapter_state(model)
    res["resumed_step"] = t.state.global_step
    t.save_model(str(OUT / "final"))
    ids = probe_ids().to(t.args.device)
    t.model.eval()
    with torch.no_grad():
        res["logits"] = t.model(input_ids=ids).logits.detach().to("cpu").clone()

    # a metric that makes the first evaluation (step 2) the best, so that the best checkpoint is not the last
    evals = iter(range(100))
    model = tiny_model()
    t = make_trainer(model, OUT / "d", eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                     metric_for_best_model="earliness", greater_is_better=True,
                     compute_metrics=lambda _: {"earliness": -next(evals)})
    t.train()
    res["best"] = adapter_state(model)
    res["best_checkpoint"] = t.state.best_model_checkpoint
    res["evals"] = [(h["eval_loss"], h["step"]) for h in t.state.log_history if "eval_loss" in h]

    if ENGINE.startswith("zero"):  # what DeepSpeed's own files hold: the module's trainable tensors only
        res["ds_files"] = {}
        for f in sorted(OUT.glob("b/checkpoint-4/global_step4/*model_states.pt")):
            ck = torch.load(f, map_location="cpu", weights_only=False)
            res["ds_files"][f.name] = {"module": sorted(ck["module"]),
                                       "frozen": ck.get("frozen_param_fragments") is not None}
    if RANK == 0:
        torch.save(res, OUT / "result.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        Path(sys.argv[2]).mkdir(parents=True, exist_ok=True)
        (Path(sys.argv[2]) / f"rank{os.environ.get('RANK', '0')}.err").write_text(traceback.format_exc())
        raise
