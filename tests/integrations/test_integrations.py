"""EPIAdamW inside Hugging Face Trainer (optimizer_cls_and_kwargs, optimizers=, gradient
accumulation, checkpoint resume, EPICallback) on a tiny random Llama with a character tokenizer."""
import os
import random

import pytest
import torch

pytest.importorskip("transformers", reason="transformers not installed (the experiments extra)")
pytest.importorskip("accelerate", reason="accelerate not installed (the experiments extra)")
os.environ["HF_HUB_OFFLINE"] = "1"

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from epi_kernels import EPIAdamW  # noqa: E402
from epi_kernels.experiments.data import CharTokenizer  # noqa: E402
from epi_kernels.experiments.model import tiny_llama  # noqa: E402
from epi_kernels.integrations import EPICallback  # noqa: E402

TOK = CharTokenizer()
EPI = dict(lr=3e-3, isolation_ratio=0.1, refresh_interval=3, warmup_steps=2)


def _data(n=64, seed=0):
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        pairs.append((f"{a}+{b}=", str(a + b)))
    return pairs


def _args(out, **kw):
    kw = {"save_strategy": "no", **kw}
    return TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, learning_rate=3e-3,
                             use_cpu=True, report_to="none", seed=0, data_seed=0, logging_steps=1,
                             remove_unused_columns=False, disable_tqdm=True, **kw)


def _trainer(out, callbacks=(), optimizers=None, **kw):
    model = tiny_llama(TOK.vocab_size, 0, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    opt_kw = {} if optimizers else {"optimizer_cls_and_kwargs": (EPIAdamW, {k: v for k, v in EPI.items() if k != "lr"})}
    return Trainer(model=model, args=_args(out, **kw), train_dataset=_data(), data_collator=TOK.batch,
                   callbacks=list(callbacks), optimizers=optimizers(model) if optimizers else (None, None), **opt_kw)


def _epi(trainer):
    opt = trainer.optimizer
    while not isinstance(opt, EPIAdamW):
        opt = opt.optimizer
    return opt


class _Recorder(TrainerCallback):
    """Sees the logs after EPICallback, as a reporting integration would."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_trainer_counts_optimizer_steps_not_micro_batches_and_logs_refreshes(tmp_path):
    cb, rec = EPICallback(), _Recorder()
    tr = _trainer(tmp_path, [cb, rec], max_steps=8, gradient_accumulation_steps=2)
    tr.train()
    opt = _epi(tr)
    assert tr.state.global_step == 8
    assert opt.param_groups[0]["epi_step"] == 8  # 16 micro-batches, 8 optimizer steps
    assert [h["step"] for h in cb.history] == [2, 5, 8]  # warmup 2, then every 3 optimizer steps
    logged = [e for e in rec.logs if "epi/isolated_fraction" in e]
    assert len(logged) == 3 and all(0.0 < e["epi/isolated_fraction"] <= 0.1 for e in logged)
    assert sum(int(opt.isolation_mask(p).sum()) for p in tr.model.parameters()) > 0


def test_trainer_with_optimizers_argument_and_stage_boundary(tmp_path):
    cb = EPICallback(stage_boundaries=[3])
    make = lambda model: (EPIAdamW(model.parameters(), **{**EPI, "warmup_steps": 100}), None)  # noqa: E731
    tr = _trainer(tmp_path, [cb], optimizers=make, max_steps=6)
    tr.train()
    assert [h["step"] for h in cb.history] == [4]  # only the refresh requested after step 3


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    full = _trainer(tmp_path / "full", max_steps=8)
    full.train()
    first = _trainer(tmp_path / "part", max_steps=8, save_strategy="steps", save_steps=4)
    first.train()  # saves checkpoint-4 (and -8)
    resumed = _trainer(tmp_path / "part", max_steps=8)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-4"))  # loads with weights_only
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    sa, sb = _epi(full).state_dict()["state"], _epi(resumed).state_dict()["state"]
    for i in sa:
        for key in ("importance", "isolation_mask", "threshold_bits", "exp_avg"):
            assert torch.equal(sa[i][key], sb[i][key]), key


def test_lightning_fit_runs_the_closure_and_matches_a_plain_loop(tmp_path):
    L = pytest.importorskip("lightning", reason="lightning not installed")

    torch.manual_seed(0)
    xs, ys = torch.randn(48, 8), torch.randn(48, 2)
    batches = [(xs[i:i + 8], ys[i:i + 8]) for i in range(0, 48, 8)]

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return EPIAdamW(self.parameters(), **EPI)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=8)

    module = Module()
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module)
    opt = trainer.optimizers[0]
    assert opt.param_groups[0]["epi_step"] == 6 and any(opt.isolation_mask(p).any() for p in module.parameters())

    plain = Module()
    ref = EPIAdamW(plain.parameters(), **EPI)
    for x, y in batches:
        ref.zero_grad()
        torch.nn.functional.mse_loss(plain.net(x), y).backward()
        ref.step()
    for a, b in zip(module.parameters(), plain.parameters()):
        assert torch.equal(a, b)
