"""RandLoraTrainer finds the adapter wherever it sits in its model, refuses what it cannot checkpoint
adapter-only, and trains under several processes: DDP, FSDP2 (through accelerate) and DeepSpeed ZeRO-2 and
ZeRO-3, each with two CPU processes on gloo.

An engine test launches ``tests/_engine_worker.py`` once per rank (torchrun's environment variables, a free
port) and checks what the four runs there wrote (see the worker's docstring): checkpoint folders that hold
the adapter file and no model weights, a resumed run equal to an uninterrupted one to 1e-6, the best
checkpoint's adapter loaded at the end, and the final adapter file reproducing the trained model's logits in
a plain single-process model. The adapter is injected into ``model.model``, not the model the Trainer gets.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import randlora
from randlora.errors import CheckpointError, StateError

transformers = pytest.importorskip("transformers", reason="transformers is an optional test dependency")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")

from randlora.hf import ADAPTER_FILE, EXTRA_FILE, trainer_class  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from stop_at import StopAt  # noqa: E402

import _engine_worker as worker  # noqa: E402  (tests/ is on sys.path: conftest.py)

TIMEOUT_S = 240  # one launch: four short runs; about 15 s on two idle cores
WHOLE_MODEL = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
               "pytorch_model.bin.index.json", "config.json"}
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------------------------------------
# launching
# ------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(engine: str, out: Path, world: int, device: str = "cpu") -> dict:
    """Run the worker on ``world`` ranks; fail with the failing rank's traceback; rank 0's results."""
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    env.update(OMP_NUM_THREADS="1", RANDLORA_TEST_DEVICE=device, TOKENIZERS_PARALLELISM="false")
    if engine.startswith("zero"):
        env.setdefault("DS_ACCELERATOR", device)
    distributed = world > 1 or device != "cpu"
    if distributed:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world))
    procs, logs = [], []
    for r in range(world):
        logs.append(open(out / f"log{r}.txt", "w"))
        rank_env = dict(env, RANK=str(r), **({"LOCAL_RANK": str(r)} if distributed else {}))
        procs.append(subprocess.Popen([sys.executable, str(worker.__file__), engine, str(out)], env=rank_env,
                                      stdout=logs[-1], stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break  # a rank failed (its peers may wait in a collective forever) or time is up
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        for f in logs:
            f.close()
    if any(p.returncode != 0 for p in procs):
        errs = [e.read_text() for e in sorted(out.glob("rank*.err"))]
        tails = [(out / f"log{r}.txt").read_text()[-3000:] for r in range(world)]
        timed_out = time.monotonic() > deadline
        pytest.fail(f"{engine} workers {'timed out' if timed_out else 'failed'} "
                    f"(exit codes {[p.returncode for p in procs]}):\n" + "\n".join(errs or tails))
    return torch.load(out / "result.pt", weights_only=True)


def adapter_keys() -> set[str]:
    """The adapter's keys, relative to the module it was injected into (``model.model``)."""
    model = worker.tiny_model()
    return {k for k in randlora.state_dict(model.model, save_projection=False) if k != "randlora_fingerprint"}


def check_run(engine: str, out: Path, res: dict) -> None:
    keys = adapter_keys()
    extra = {worker.EXTRA} if worker.trains_extra(engine) else set()
    trained = keys | extra
    weights = sum(p.numel() * p.element_size() for p in worker.base_model().parameters())

    # checkpoints: the adapter file (root-relative keys), no model weights in any file
    folders = sorted(out.glob("[abd]/checkpoint-*")) + [out / "final"]
    assert [f.name for f in folders[:3]] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"] and len(folders) == 10
    for folder in folders:
        names = {p.name for p in folder.iterdir()}
        assert ADAPTER_FILE in names, folder
        assert not names & WHOLE_MODEL and not any("fsdp" in n for n in names), (folder, sorted(names))
        size = (folder / ADAPTER_FILE).stat().st_size
        assert size < 32 * 1024 and size * 16 < weights, (folder, size, weights)  # λ, γ, the fingerprint
        tensors, _ = randlora.checkpoint.read_file(folder / ADAPTER_FILE)
        assert set(tensors) == keys | {"randlora_fingerprint"}, folder
        if extra:  # trained beside the adapter
            assert set(load_file(str(folder / EXTRA_FILE))) == extra, folder
        else:
            assert EXTRA_FILE not in names, folder
        big = [(p.name, p.stat().st_size) for p in folder.rglob("*") if p.is_file() and p.stat().st_size * 4 > weights]
        assert not big, f"{folder} holds a file the size of the model's weights ({weights} bytes): {big}"
    assert {p.name for p in (out / "final").iterdir()} == {ADAPTER_FILE, "training_args.bin"} | ({EXTRA_FILE} if extra else set())

    # resumed at step 4 == uninterrupted, and it did train after resuming
    assert res["resumed_step"] == worker.MAX_STEPS
    straight, resumed, at4 = res["straight"], res["resumed"], res["at4"]
    assert set(straight) == set(resumed) == trained
    for k in trained:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert all(not torch.allclose(resumed[k], at4[k], atol=1e-4) for k in keys if k.endswith("lambda"))

    # the best checkpoint (step 2, by the worker's metric) is what the model holds at the end
    assert res["best_checkpoint"].endswith(os.path.join("d", "checkpoint-2")), res["best_checkpoint"]
    best, _ = randlora.checkpoint.read_file(out / "d" / "checkpoint-2" / ADAPTER_FILE)
    last, _ = randlora.checkpoint.read_file(out / "d" / "checkpoint-6" / ADAPTER_FILE)
    if extra:
        best[worker.EXTRA] = load_file(str(out / "d" / "checkpoint-2" / EXTRA_FILE))[worker.EXTRA]
    assert all(torch.equal(res["best"][k], best[k]) for k in trained)
    assert any(not torch.equal(res["best"][k], last[k]) for k in keys)

    # the final adapter file, on a plain model in this process, computes what the trained model computed
    plain = worker.base_model()
    randlora.load(plain.model, out / "final" / ADAPTER_FILE)
    if extra:
        plain.load_state_dict(load_file(str(out / "final" / EXTRA_FILE)), strict=False)
    plain.eval()
    with torch.no_grad():
        want = plain(input_ids=worker.probe_ids()).logits
    torch.testing.assert_close(res["logits"], want, rtol=1e-5, atol=1e-5)


def _deepspeed_missing() -> str | None:
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install deepspeed==0.19.8; DS_ACCELERATOR=cpu runs it on gloo)"
    return None


def _fsdp2_missing() -> str | None:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as e:
        return f"this torch has no FSDP2 (torch.distributed.fsdp.fully_shard): {e}"
    return None


needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")
ENGINES = {
    "one": (1, {}),
    "ddp": (2, {"ddp": True}),
    "fsdp2": (2, {"fsdp": True, "dtensor": True}),
    "zero2": (2, {"deepspeed": True, "zero_stage": 2, "ds_partitioned": False}),
    "zero3": (2, {"deepspeed": True, "zero_stage": 3, "ds_partitioned": True}),
}


@needs_gloo
@pytest.mark.parametrize("engine", [
    "one",
    "ddp",
    pytest.param("fsdp2", marks=pytest.mark.skipif(_fsdp2_missing() is not None, reason=str(_fsdp2_missing()))),
    pytest.param("zero2", marks=pytest.mark.skipif(_deepspeed_missing() is not None, reason=str(_deepspeed_missing()))),
    pytest.param("zero3", marks=pytest.mark.skipif(_deepspeed_missing() is not None, reason=str(_deepspeed_missing()))),
])
def test_engine_checkpoints_hold_the_adapter_and_resume_exactly(engine, tmp_path):
    world, flags = ENGINES[engine]
    res = launch(engine, tmp_path, world)
    assert res["engine"]["world"] == world
    for flag in ("ddp", "fsdp", "dtensor", "deepspeed", "ds_partitioned"):
        assert res["engine"][flag] == flags.get(flag, False), (flag, res["engine"])
    assert res["engine"]["zero_stage"] == flags.get("zero_stage")
    check_run(engine, tmp_path, res)
    if engine.startswith("zero"):  # DeepSpeed's own files: the trainable tensors, no frozen weights
        assert res["ds_files"]
        for name, held in res["ds_files"].items():
            want = sorted([f"model.{k}" for k in adapter_keys()] + [worker.EXTRA] * worker.trains_extra(engine))
            assert held["module"] == want and not held["frozen"], name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by benchmarks/gpu_check.sh)")
def test_fsdp2_on_cuda_through_accelerate_unchanged(tmp_path):
    """On a GPU accelerate turns FSDP2 on by itself (no state switch as on the CPU): NCCL, one rank per GPU."""
    world = min(2, torch.cuda.device_count())
    res = launch("fsdp2", tmp_path, world, device="cuda")
    assert res["engine"]["fsdp"] and res["engine"]["dtensor"] and res["engine"]["world"] == world
    keys = adapter_keys()
    for k in keys:
        torch.testing.assert_close(res["resumed"][k], res["straight"][k], rtol=0, atol=1e-6)
    for folder in sorted(tmp_path.glob("[abd]/checkpoint-*")):
        names = {p.name for p in folder.iterdir()}
        assert ADAPTER_FILE in names and not names & WHOLE_MODEL and not any("fsdp" in n for n in names)


# ------------------------------------------------------------------------------------------------
# refusals when the Trainer is built (one process)
# ------------------------------------------------------------------------------------------------
def _args(out, **kw):
    base = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, save_steps=2, use_cpu=True,
                report_to=[], disable_tqdm=True, remove_unused_columns=False)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _check_message(msg: str, *needles: str) -> None:
    assert len(msg) < 1500, len(msg)
    for n in needles:
        assert n in msg, (n, msg)


def test_a_model_without_an_adapter_is_refused_when_the_trainer_is_built(tmp_path):
    Trainer = trainer_class()
    out = tmp_path / "out"
    with pytest.raises(StateError) as e:
        Trainer(model=worker.base_model(), args=_args(out), train_dataset=worker.data(8, 0))
    _check_message(str(e.value), "holds no RandLora adapter", "randlora.inject(", "transformers.Trainer",
                   "LlamaForCausalLM")
    assert str(e.value).startswith("RandLoraTrainer's model holds no RandLora adapter")
    assert not out.exists()  # refused before anything was written
    with pytest.raises(StateError, match="holds no RandLora adapter"):  # a model from model_init: the same
        Trainer(model_init=worker.base_model, args=_args(out), train_dataset=worker.data(8, 0))


def _trained(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_parameters_trained_outside_the_adapter_are_checkpointed_beside_it(tmp_path):
    """``inject(model.model)`` leaves ``lm_head`` trainable: checkpoints hold it in EXTRA_FILE, resume
    restores it exactly, and a resume whose trainable parameters differ is refused before anything loads."""
    def build():
        model = worker.base_model()
        randlora.inject(model.model, worker.TARGETS, r=8)  # leaves lm_head, outside model.model, trainable
        return model

    def run(out, max_steps, resume=None, model=None):
        model = build() if model is None else model
        args = _args(out, max_steps=max_steps, lr_scheduler_type="constant")  # the same rates stopped at 2 or not
        t = trainer_class()(model=model, args=args, train_dataset=worker.data(16, 0))
        t.train(resume_from_checkpoint=resume)
        return model

    straight = _trained(run(tmp_path / "a", 4))
    assert "lm_head.weight" in straight
    run(tmp_path / "b", 2)
    ck = tmp_path / "b" / "checkpoint-2"
    files = {p.name for p in ck.iterdir()}
    assert {ADAPTER_FILE, EXTRA_FILE} <= files and not files & WHOLE_MODEL
    assert set(load_file(str(ck / EXTRA_FILE))) == {"lm_head.weight"}
    resumed = _trained(run(tmp_path / "b", 4, resume=str(ck)))
    assert set(resumed) == set(straight)
    for k in straight:
        assert (resumed[k] - straight[k]).abs().max().item() <= 1e-6, k
    frozen = build()
    frozen.lm_head.requires_grad_(False)
    with pytest.raises(CheckpointError) as e:
        run(tmp_path / "c", 4, resume=str(ck), model=frozen)
    _check_message(str(e.value), "holds 1 the model does not train ('lm_head.weight')", EXTRA_FILE,
                   "nothing was loaded")


def test_several_separate_adapters_are_refused(tmp_path):
    model = worker.base_model()
    randlora.inject(model.model.layers[0], ["q_proj"], r=8)
    randlora.inject(model.model.layers[1], ["q_proj"], r=8)
    model.requires_grad_(False)
    with pytest.raises(StateError) as e:
        trainer_class()(model=model, args=_args(tmp_path), train_dataset=worker.data(8, 0))
    _check_message(str(e.value), "RandLoraTrainer's model holds 2 separate RandLora adapters", "'model.layers.0'",
                   "'model.layers.1'", "Inject once")


def test_fsdp1_is_refused(tmp_path):
    model = worker.tiny_model()
    model.lm_head.requires_grad_(False)
    t = trainer_class()(model=model, args=_args(tmp_path), train_dataset=worker.data(8, 0))
    t._refuse_unsupported()  # one process: fine
    t.is_fsdp_enabled = True
    t.accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1)))
    with pytest.raises(StateError) as e:
        t._refuse_unsupported()
    _check_message(str(e.value), "FSDP1", "{'version': 2}")


# ------------------------------------------------------------------------------------------------
# a checkpoint of a run without this integration (whole-model weights) still resumes, one process
# ------------------------------------------------------------------------------------------------
def test_resume_from_a_whole_model_checkpoint_of_a_plain_trainer_run(tmp_path):
    def run(trainer_type, out, stop=None, resume=None):
        model = worker.tiny_model()
        model.lm_head.requires_grad_(False)
        args = _args(out, max_steps=4, per_device_train_batch_size=4, learning_rate=3e-2, seed=0, warmup_steps=1)
        cb = [StopAt(stop)] if stop else []
        trainer_type(model=model, args=args, train_dataset=worker.data(24, 0), callbacks=cb).train(
            resume_from_checkpoint=resume)
        return {k: v.clone() for k, v in randlora.state_dict(model.model, save_projection=False).items()}

    want = run(trainer_class(), tmp_path / "straight")
    run(transformers.Trainer, tmp_path / "plain", stop=2)  # whole-model checkpoint-2
    assert (tmp_path / "plain" / "checkpoint-2" / "model.safetensors").is_file()
    got = run(trainer_class(), tmp_path / "plain", resume=str(tmp_path / "plain" / "checkpoint-2"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    names = {p.name for p in (tmp_path / "plain" / "checkpoint-4").iterdir()}  # later checkpoints: adapter only
    assert ADAPTER_FILE in names and not names & WHOLE_MODEL


