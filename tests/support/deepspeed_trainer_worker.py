"""One rank of the Hugging Face Trainer + DeepSpeed test (tests/distributed/test_deepspeed.py): EPIAdamW via
`optimizer_cls_and_kwargs` with a DeepSpeed config (ZeRO 0, 2, 3) on a tiny random Llama, 2 CPU
processes (gloo). Saves, per stage, the gathered masks and parameters, the isolation statistics,
the step counters and what EPICallback logged."""
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from epi_kernels import EPIAdamW  # noqa: E402
from epi_kernels.experiments.data import CharTokenizer  # noqa: E402
from epi_kernels.experiments.model import tiny_llama  # noqa: E402
from epi_kernels.integrations import EPICallback  # noqa: E402

TOK = CharTokenizer()
STEPS = 6
EPI = dict(isolation_ratio=0.1, refresh_interval=2, warmup_steps=2)


def data(n=96):
    g = torch.Generator().manual_seed(0)
    pairs = torch.randint(0, 100, (n, 2), generator=g).tolist()
    return [(f"{a}+{b}=", str(a + b)) for a, b in pairs]


class Logs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({k: v for k, v in (logs or {}).items() if k.startswith("epi/")})


def run(stage, out):
    torch.manual_seed(0)
    model = tiny_llama(TOK.vocab_size, 0, hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64)
    ds = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "zero_optimization": {"stage": stage}}
    args = TrainingArguments(output_dir=f"{out}/trainer-zero{stage}", per_device_train_batch_size=4, max_steps=STEPS,
                             learning_rate=3e-3, lr_scheduler_type="constant", max_grad_norm=0.0, deepspeed=ds,
                             use_cpu=True, ddp_backend="gloo", report_to="none", seed=0, data_seed=0,
                             logging_steps=1, save_strategy="no", remove_unused_columns=False, disable_tqdm=True)
    logs = Logs()
    trainer = Trainer(model=model, args=args, train_dataset=data(), data_collator=TOK.batch,
                      optimizer_cls_and_kwargs=(EPIAdamW, EPI), callbacks=[EPICallback(), logs])
    trainer.train()
    opt = trainer.optimizer
    while not isinstance(opt, EPIAdamW):
        opt = opt.optimizer
    params = [p for p in trainer.model_wrapped.module.parameters()]
    masks = [opt.isolation_mask(p, gather=True) for p in params]
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        values = [p.detach().clone() for p in params]
    stats = [{k: s[k] for k in ("k", "selected", "threshold_bits", "refresh_step", "numel", "name")}
             for s in opt.isolation_stats()]
    return {"masks": masks, "params": values, "stats": sorted(stats, key=lambda s: s["name"] or ""),
            "epi_step": [g["epi_step"] for g in opt.param_groups], "logs": [x for x in logs.logs if x]}


def main(out, stages):
    results = {stage: run(stage, out) for stage in stages}
    if dist.get_rank() == 0:
        torch.save(results, f"{out}/trainer.pt")
        with open(f"{out}/trainer-done.json", "w") as f:
            json.dump(stages, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo's threads can abort the interpreter's shutdown after all work is saved


if __name__ == "__main__":
    main(sys.argv[1], [int(s) for s in sys.argv[2:]])
