"""DeepSpeed ZeRO 0-3 (2 CPU processes, gloo, `torch.distributed.run`; tests/support/deepspeed_worker.py):
EPIAdamW as the client optimizer of `deepspeed.initialize` isolates per model parameter, not per
flat partition: after every step the gathered masks, the per-tensor statistics and the parameters
equal a single-process run's bit for bit, at every stage, with several ZeRO-3 sub-groups (also one
scope="global" selection over them), with the
kernel backends, with the optimizer offloaded to the CPU, and in bf16 (fp32 master weights); a run
resumed from a DeepSpeed checkpoint continues bit for bit; DeepSpeed's per-parameter state views
read the scores; settings that cannot hold raise at the first step. And the same through the
Hugging Face Trainer's DeepSpeed integration (tests/support/deepspeed_trainer_worker.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -e '.[test]' installs it)")

from epi_kernels import EPIAdamW  # noqa: E402
from support.deepspeed_worker import (  # noqa: E402
    CONFIGS, EPI, REFUSED, SAVE_AT, STEPS, batch, loss_of, model, settings_of, snapshot)
from support.devices import CPU_KERNEL_BACKENDS  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # torchrun launches of 2 DeepSpeed ranks

SUPPORT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support")  # the workers
BACKEND_MARKS = {p.values[0]: p.marks for p in CPU_KERNEL_BACKENDS}
RUNNABLE = [name for name, (_, backend) in CONFIGS.items()
            if backend == "torch" or not any(m.args[0] for m in BACKEND_MARKS[backend] if m.name == "skipif")]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every configuration in one launch of 2 ranks (DeepSpeed's start-up dominates a launch)."""
    out = tmp_path_factory.mktemp("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    names = RUNNABLE + list(REFUSED)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           os.path.join(SUPPORT, "deepspeed_worker.py"), str(out), *names],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and (out / "done.json").exists(), proc.stdout[-4000:] + proc.stderr[-8000:]
    assert json.loads((out / "done.json").read_text()) == names
    return {name: torch.load(out / f"{name}.pt", weights_only=False) for name in names}


def _single_process(backend, bf16=False, **settings):
    """The reference: the same model, batches and settings in one process, no DeepSpeed. bf16: a
    bf16 model whose fp32 copies ("master weights") EPIAdamW steps, copied back after each step."""
    m = model().to(torch.bfloat16 if bf16 else torch.float32)
    params = list(m.parameters())
    master = [torch.nn.Parameter(p.detach().float()) for p in params] if bf16 else params
    opt = EPIAdamW(master, backend=backend, **EPI, **settings)
    snaps = []
    for step in range(STEPS):
        x, y = (t.to(params[0].dtype) for t in batch(step))
        m.zero_grad()
        loss_of(m(x), y).backward()
        for p, w in zip(params, master):
            w.grad = p.grad.float()
        opt.step()
        for p, w in zip(params, master):
            p.data.copy_(w)
        snaps.append(snapshot(opt, master, lambda: params))  # (gather=True of a whole tensor: its mask)
    state = {key: [opt.state[w][key] for w in master] for key in ("importance", "exp_avg_sq")}
    return snaps, state


def _config_params():
    for name, (cfg, backend) in CONFIGS.items():
        yield pytest.param(name, id=name, marks=BACKEND_MARKS.get(backend, ()))


def _assert_same(run, ref):
    for key in ("masks", "params"):
        assert len(run[key]) == len(ref[key]) == 4
        for i, (a, b) in enumerate(zip(run[key], ref[key])):
            assert a.shape == b.shape and torch.equal(a, b), f"{key}[{i}]"
    assert run["stats"] == ref["stats"]


@pytest.mark.parametrize("name", list(_config_params()))
def test_zero_stage_isolates_per_model_parameter_like_one_process(results, name):
    cfg, backend = CONFIGS[name]
    got = results[name]
    ref, ref_state = _single_process(backend, bf16=name.endswith("bf16"), **settings_of(name))
    assert sum(s["selected"] for s in ref[-1]["stats"]) > 0  # something is isolated (refreshes at 2, 4, 6)
    for step in range(STEPS):
        _assert_same(got["steps"][step], ref[step])
    for step in range(SAVE_AT, STEPS):  # resumed from the checkpoint saved after step SAVE_AT
        _assert_same(got["resumed"][step - SAVE_AT], ref[step])
    assert got["epi_step"] == [STEPS]  # counted once per engine step, however many sub-groups
    # stage 0 hands the optimizer the model's own parameters; 1-3 flat partitions (3: per sub-group)
    assert got["partitions"] == {0: 0, 1: 1, 2: 1, 3: 2 if "sub_group_size" in cfg else 1}[cfg["stage"]]
    if cfg["stage"]:  # DeepSpeed's per-parameter views of the elementwise state
        for key, tensors in got["views"].items():
            assert all(torch.equal(a, b.reshape(a.shape)) for a, b in zip(tensors, ref_state[key])), key


@pytest.mark.parametrize("name,message", [("elastic", "does not support elastic_checkpoint")])
def test_zero_settings_that_cannot_hold_raise_at_the_first_step(results, name, message):
    """At the first step, or the first after the setting changed (never a silent flat top-k)."""
    assert results[name]["error"] is not None
    step, error = results[name]["error"]
    assert step == (1 if REFUSED[name][2] else 0) and message in error


@pytest.fixture(scope="module")
def trainer_results(tmp_path_factory):
    """The Hugging Face Trainer with a DeepSpeed config at ZeRO 0, 2 and 3 (one launch of 2 ranks)."""
    pytest.importorskip("transformers", reason="transformers not installed (the experiments extra)")
    pytest.importorskip("accelerate", reason="accelerate not installed (the experiments extra)")
    out = tmp_path_factory.mktemp("trainer")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           os.path.join(SUPPORT, "deepspeed_trainer_worker.py"), str(out), "0", "2",
                           "3"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and (out / "trainer-done.json").exists(), proc.stdout[-4000:] + proc.stderr[-8000:]
    return torch.load(out / "trainer.pt", weights_only=False)


def test_hf_trainer_with_a_zero_config_isolates_as_at_zero_0(trainer_results):
    """Through `TrainingArguments(deepspeed=...)` and `optimizer_cls_and_kwargs` (a tiny Llama, 21
    tensors in two param groups, each rank its own batches): at ZeRO 0 EPIAdamW steps the model's
    own parameters (the per-tensor case tested against one process above), and ZeRO 2 and 3 must
    select the same elements. ZeRO 2 equals it bit for bit, parameters included. ZeRO 3's
    parameters differ from ZeRO 0's in the last bits (at most 4e-7 here) for plain
    torch.optim.AdamW too (DeepSpeed's own arithmetic on that path), so they are compared to
    rounding; masks, thresholds, counts, step counters and EPICallback's logs exactly."""
    base = trainer_results[0]
    assert len(base["masks"]) == 21 and base["epi_step"] == [6, 6]
    assert all(s["selected"] > 0 for s in base["stats"])
    assert [round(x["epi/isolated_fraction"], 2) for x in base["logs"]] == [0.1, 0.1, 0.1]
    for stage in (2, 3):
        got = trainer_results[stage]
        assert all(torch.equal(a, b) for a, b in zip(got["masks"], base["masks"])), stage
        assert got["stats"] == base["stats"] and got["epi_step"] == base["epi_step"] and got["logs"] == base["logs"]
        if stage == 2:
            assert all(torch.equal(a, b) for a, b in zip(got["params"], base["params"]))
        else:
            assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(got["params"], base["params"]))
