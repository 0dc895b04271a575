"""One rank of the DeepSpeed ZeRO test (tests/distributed/test_deepspeed.py), run by torch.distributed.run with
2 CPU processes (gloo): EPIAdamW as the client optimizer of `deepspeed.initialize`, at ZeRO stage
0, 1, 2, 3 and 3 with several sub-groups, each run's masks, statistics and parameters saved after
every step (gathered: the whole tensors), then a run resumed from a checkpoint taken mid-way.

Both ranks see the same batch, so the averaged gradient equals one process's bit for bit and any
difference from the single-process run is the optimizer's."""
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from epi_kernels import EPIAdamW  # noqa: E402

STEPS, SAVE_AT = 6, 3
EPI = dict(lr=0.01, isolation_ratio=0.1, refresh_interval=2, warmup_steps=2)
# name -> (zero_optimization, EPIAdamW backend); sub_group_size 1500 puts the 8 elements of the last
# bias of each rank in a second sub-group (1024 + 32 + 512 in the first)
CONFIGS = {"zero0": (dict(stage=0), "torch"), "zero1": (dict(stage=1), "torch"), "zero2": (dict(stage=2), "torch"),
           "zero3": (dict(stage=3), "torch"), "zero3-subgroups": (dict(stage=3, sub_group_size=1500), "torch"),
           "zero2-triton": (dict(stage=2), "triton"), "zero2-cuda": (dict(stage=2), "cuda"),
           "zero3-subgroups-triton": (dict(stage=3, sub_group_size=1500), "triton"),
           "zero3-subgroups-cuda": (dict(stage=3, sub_group_size=1500), "cuda"),
           "zero2-offload": (dict(stage=2, offload_optimizer=dict(device="cpu")), "torch"),
           "zero3-offload": (dict(stage=3, sub_group_size=1500, offload_optimizer=dict(device="cpu")), "torch"),
           # bf16 training: a bf16 model, fp32 master partitions
           "zero2-bf16": (dict(stage=2), "torch"), "zero3-bf16": (dict(stage=3), "torch"),
           # scope="global" (one selection over the partition's model parameters) and exact thresholds
           "zero1-global": (dict(stage=1), "torch"), "zero2-global": (dict(stage=2), "torch"),
           "zero3-global": (dict(stage=3), "torch"), "zero2-exact": (dict(stage=2), "torch"),
           "zero3-global-exact": (dict(stage=3), "torch"),
           # one selection over the param group's two sub-groups, each stepped by a step() call of its own
           "zero3-subgroups-global": (dict(stage=3, sub_group_size=1500), "torch"),
           "zero3-subgroups-global-triton": (dict(stage=3, sub_group_size=1500), "triton")}
# settings that cannot hold under ZeRO: name -> (zero_optimization, EPIAdamW arguments, group settings
# changed after one step)
REFUSED = {"elastic": (dict(stage=2, elastic_checkpoint=True), {}, {})}


def settings_of(name):
    """The EPIAdamW settings a configuration's name asks for beside EPI."""
    return {**({"scope": "global"} if "-global" in name else {}), **({"threshold": "exact"} if "-exact" in name else {})}


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    scale = torch.logspace(-2, 1, 32)  # features of mixed magnitudes
    return torch.randn(8, 32, generator=g) * scale, torch.randn(8, 16, generator=g)


def loss_of(out, y):
    return torch.nn.functional.mse_loss(out, y)


def snapshot(opt, params, gathered):
    """Masks, per-tensor statistics and parameter values of the whole tensors."""
    stats = [{k: s[k] for k in ("k", "selected", "threshold_bits", "refresh_step", "numel")}
             for s in opt.isolation_stats()]
    return {"masks": [opt.isolation_mask(p, gather=True) for p in params], "stats": stats,
            "params": [t.detach().clone() for t in gathered()]}


def engine_for(cfg, bf16=False, **epi):
    m = model()
    config = {"bf16": {"enabled": bf16}, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
              "gradient_clipping": 0.0,  # (DeepSpeed's default clips at 1.0)
              "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,  # (offload)
              "zero_optimization": cfg}
    epi = EPIAdamW(m.parameters(), **{**EPI, **epi})
    eng, _, _, _ = deepspeed.initialize(model=m, optimizer=epi, config=config)
    params = list(m.parameters())

    def gathered():
        if cfg["stage"] == 3:
            with deepspeed.zero.GatheredParameters(params):
                return [p.detach().clone() for p in params]
        return [p.detach() for p in params]

    return eng, epi, params, gathered


def train(eng, epi, params, gathered, steps, dtype=torch.float32):
    out = []
    for step in steps:
        x, y = (t.to(dtype) for t in batch(step))
        loss = loss_of(eng(x), y)
        eng.backward(loss)
        eng.step()
        out.append(snapshot(epi, params, gathered))
    return out


def state_views(params):
    """DeepSpeed's per-parameter views of the optimizer state (of flat partitions), gathered."""
    from deepspeed.utils import safe_get_full_optimizer_state

    return {key: [safe_get_full_optimizer_state(p, key).clone() for p in params]
            for key in ("importance", "exp_avg_sq")}


def run(name, out_dir):
    cfg, backend = CONFIGS[name]
    bf16 = name.endswith("bf16")
    dtype = torch.bfloat16 if bf16 else torch.float32
    eng, epi, params, gathered = engine_for(cfg, bf16, backend=backend, **settings_of(name))
    steps = train(eng, epi, params, gathered, range(SAVE_AT), dtype)
    eng.save_checkpoint(f"{out_dir}/ckpt-{name}", tag="t")
    steps += train(eng, epi, params, gathered, range(SAVE_AT, STEPS), dtype)
    views = state_views(params) if cfg["stage"] else None  # (ZeRO 0: whole tensors, no views)
    eng2, epi2, params2, gathered2 = engine_for(cfg, bf16, backend=backend, **settings_of(name))
    eng2.load_checkpoint(f"{out_dir}/ckpt-{name}", tag="t")
    resumed = train(eng2, epi2, params2, gathered2, range(SAVE_AT, STEPS), dtype)
    return {"steps": steps, "resumed": resumed, "views": views, "epi_step": [g["epi_step"] for g in epi.param_groups],
            # flat partitions: their per-tensor state entries are vectors (one per model parameter)
            "partitions": sum(st["threshold_bits"].dim() == 1 for st in epi.state.values() if "threshold_bits" in st)}


def refused(name):
    """The error the first step (after the change) raises, the same on every rank."""
    cfg, settings, change = REFUSED[name]
    eng, epi, _, _ = engine_for(cfg, **settings)
    for step in range(2 if change else 1):
        if step:
            epi.param_groups[0].update(change)
        x, y = batch(step)
        eng.backward(loss_of(eng(x), y))
        try:
            eng.step()
        except RuntimeError as e:
            return (step, str(e))
    return None


def main(out_dir, names):
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    for name in names:
        result = run(name, out_dir) if name in CONFIGS else {"error": refused(name)}
        if rank == 0:
            torch.save(result, f"{out_dir}/{name}.pt")
    dist.barrier()
    if rank == 0:
        with open(f"{out_dir}/done.json", "w") as f:
            json.dump(names, f)
    dist.destroy_process_group()
    os._exit(0)  # gloo's threads can abort the interpreter's shutdown after all work is saved


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
