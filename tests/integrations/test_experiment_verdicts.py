"""Verdicts that replicate: the environment each results.json records, the robust metrics, the
split-half check of a verdict, and `--replicate FILE` (toy sizes; never a full run here)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

for mod in ("transformers", "mathematics_dataset", "matplotlib", "tqdm"):
    pytest.importorskip(mod, reason="the experiments extra is not installed")
os.environ["HF_HUB_OFFLINE"] = "1"

from epi_kernels.experiments import environment as env  # noqa: E402
from epi_kernels.experiments.__main__ import main  # noqa: E402
from epi_kernels.experiments.multitask import mean_drop  # noqa: E402
from epi_kernels.experiments.verdicts import (INCONCLUSIVE, split_half, stated,  # noqa: E402
                                              verdict)

DROP = "worst-task drop (lower is better)"


def test_mean_drop_is_the_average_distance_below_the_best_so_far():
    # best so far 0.1, 0.4, 0.4, 0.5, 0.5 -> below it by 0, 0, 0.2, 0, 0.05
    assert mean_drop([0.1, 0.4, 0.2, 0.5, 0.45]) == pytest.approx(0.25 / 5)
    assert mean_drop([0.3, 0.2, 0.1]) == pytest.approx(0.3 / 3) and mean_drop([0.1, 0.2]) == 0.0


@pytest.mark.parametrize("ci,label,expected", [
    ([0.01, 0.05], "final average EM", "better"), ([-0.05, -0.01], "final average EM", "worse"),
    ([-0.05, -0.01], DROP, "better"), ([0.01, 0.05], DROP, "worse"),
    ([-0.01, 0.05], "final average EM", "no difference"), ([0.0, 0.05], DROP, "no difference"),
    (None, "final average EM", "no difference")])
def test_a_verdict_reads_the_interval_in_the_metrics_direction(ci, label, expected):
    assert verdict({"mean": 0.0, "ci95": ci}, label) == expected


def test_split_half_tries_every_split_once_and_names_the_halves_in_seed_order():
    # seeds 0-2 far above zero, 3-5 far below: the in-order halves disagree (better / worse); every
    # other split mixes signs in both halves, whose intervals then include zero (no difference)
    check = split_half([1.0, 1.1, 0.9, -1.0, -1.1, -0.9], "final average EM")
    assert check == {"splits": 10, "agreement": pytest.approx(9 / 10), "first_half": "better", "second_half": "worse"}
    assert split_half([0.1 * (i % 3) for i in range(10)], "x")["splits"] == 126  # C(10, 5) / 2
    assert split_half([0.1 * (i % 3) for i in range(7)], "x")["splits"] == 35  # halves of 3 and 4: C(7, 3)
    assert split_half([0.1, 0.2, 0.3, 0.4, 0.5], "x") is None  # halves of 2: no interval worth reading


def test_a_fragile_verdict_is_stated_as_inconclusive():
    d = {"mean": 0.03, "ci95": [0.01, 0.05]}
    assert stated(d, "final average EM", {"agreement": 0.8}) == "better"
    assert stated(d, "final average EM", {"agreement": 0.7}) == INCONCLUSIVE
    assert stated(d, "final average EM", None) == INCONCLUSIVE  # too few seeds to check


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1, 1, allow_nan=False).map(lambda x: round(x, 3)), min_size=6, max_size=9),
       st.randoms(use_true_random=False))
def test_split_half_agreement_depends_on_the_seeds_not_their_order(diffs, rng):
    shuffled = list(diffs)
    rng.shuffle(shuffled)
    check, again = split_half(diffs, DROP), split_half(shuffled, DROP)
    assert 0.0 <= check["agreement"] <= 1.0 and check["agreement"] == pytest.approx(again["agreement"])
    mirrored = split_half([-d for d in diffs], "final average EM")  # the same intervals, read the other way
    assert mirrored["agreement"] == pytest.approx(check["agreement"])


def test_environment_names_what_the_run_imported():
    import mathematics_dataset  # noqa: F401 - imported by every run
    import numpy

    record = env.environment()
    assert record["packages"]["torch"] == torch.__version__ and record["packages"]["numpy"] == numpy.__version__
    assert "mathematics-dataset" in record["packages"] and "epi-kernels" in record["packages"]
    assert record["cpu"]["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["torch_threads"] == torch.get_num_threads() and record["cpu"]["logical_cores"] == os.cpu_count()
    root = Path(env.__file__).resolve().parents[2]
    if (root / ".git").exists():  # a checkout (CI's clean clone); an installed wheel records None
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert record["git_revision"].split("+")[0] == head.strip()


def test_parallel_runs_record_what_their_workers_imported(tmp_path):
    # in a fresh process, as a user runs it: the model's libraries (transformers) load only in the workers
    subprocess.run([sys.executable, "-m", "epi_kernels.experiments", "multitask", "--tiny", "--methods", "adamw",
                    "--jobs", "2", "--no-progress", "--out", str(tmp_path), "--cache-dir", str(tmp_path / "c")],
                   check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    (saved,) = tmp_path.glob("multitask-*/results.json")
    packages = json.loads(saved.read_text())["environment"]["packages"]
    assert packages["transformers"] == __import__("transformers").__version__ and "torch" in packages


def test_environment_differences_name_each_field():
    old = {"date": "then", "host": "a", "packages": {"numpy": "2.4.6", "torch": "2.13.0"}, "cpu": {"simd": ["avx2"]}}
    new = {"date": "now", "host": "b", "packages": {"numpy": "2.3.0", "torch": "2.13.0"},
           "cpu": {"simd": ["avx2", "avx512f"]}, "git_revision": "abc"}
    assert env.differences(old, new) == ["cpu.simd: ['avx2'] -> ['avx2', 'avx512f']",
                                         "git_revision: (not recorded) -> abc", "packages.numpy: 2.4.6 -> 2.3.0"]
    assert env.differences(old, dict(old, date="later", host="c")) == []


def _toy(tmp_path, name, *extra):
    return main([*extra, "--out", str(tmp_path / name), "--no-progress", "--jobs", "1",
                 "--cache-dir", str(tmp_path / "cache")])


def test_replicate_reruns_the_file_and_says_which_verdicts_held(tmp_path, capsys):
    first, _ = _toy(tmp_path, "a", "forgetting", "--tiny", "--seeds", "6", "--methods", "adamw", "static")
    path = Path(first["folder"]) / "results.json"
    saved = json.loads(path.read_text())
    assert saved["environment"]["packages"]["torch"] == torch.__version__
    assert saved["verdicts"]["static - adamw"]["average EM"]["split_half"]["splits"] == 10

    again, text = _toy(tmp_path, "b", "--replicate", str(path))
    assert again["config"]["seeds"] == 6 and again["config"]["methods"] == ["adamw", "static"]
    assert again["replication"]["held"] == len(again["replication"]["verdicts"]) == 3
    assert again["replication"]["environment_differences"] == {str(path): []} and "3 of 3 verdicts held" in text

    # a committed file whose forgetting verdict was "worse" and whose run had another numpy
    saved["paired"]["static - adamw"]["forgetting (lower is better)"]["ci95"] = [0.01, 0.02]
    saved["environment"]["packages"]["numpy"] = "0.0.1"
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(saved))
    capsys.readouterr()
    third, text = _toy(tmp_path, "c", "--replicate", str(tampered))
    held = {r["metric"]: r["held"] for r in third["replication"]["verdicts"]}
    assert held == {"forgetting (lower is better)": False, "comparison__pair EM": True, "average EM": True}
    assert "2 of 3 verdicts held" in text and "| **no** |" in text
    assert "packages.numpy: 0.0.1 ->" in capsys.readouterr().err


@pytest.mark.parametrize("content,extra,message", [
    (None, [], "cannot read"), ("not json", [], "is not JSON"), ({"experiment": "forgetting"}, [], "not an experiment's"),
    ({"experiment": "drift", "config": {}, "paired": {}}, [], "is a drift run"),
    ({"experiment": "forgetting", "config": {}, "paired": {}}, [], "no paired differences"),
    ({"experiment": "forgetting", "config": {}, "paired": {"x": {}}}, ["--seeds", "3"], "only --jobs"),
    ({"experiment": "forgetting", "config": {}, "paired": {"x": {}}}, ["ablation"], "only --jobs")])
def test_replicate_refuses_what_it_cannot_rerun(tmp_path, capsys, content, extra, message):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(SystemExit) as e:
        main([*extra, "--replicate", str(path), "--out", str(tmp_path / "runs")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing was written


def _with_curves(results: dict, scale: dict[str, float]) -> dict:
    """`results` with every run's EM curve replaced by numbers set by hand: at the j-th evaluation
    (j = 1, 2, 3) of seed s, every task's EM is scale[method] * (s + 1) * j / 100."""
    for method, runs in results["runs"].items():
        for r in runs:
            r["curve"] = [{"step": c["step"], **{t: scale[method] * (r["seed"] + 1) * j / 100 for t in results["tasks"]}}
                          for j, c in enumerate(r["curve"], 1)]
    return results


def test_combine_pools_disjoint_seeds_into_one_run(tmp_path):
    paths = []
    for seed, methods in ((0, ["adamw", "epi"]), (2, ["adamw", "epi", "static"])):
        results, _ = _toy(tmp_path, f"s{seed}", "multitask", "--tiny", "--seed", str(seed), "--seeds", "2",
                          "--methods", *methods)
        paths.append(tmp_path / f"s{seed}.json")
        paths[-1].write_text(json.dumps(_with_curves(results, {"adamw": 1.0, "epi": 2.0, "static": 3.0})))
    combined, text = main(["--combine", *map(str, paths), "--out", str(tmp_path / "c"), "--no-progress"])
    assert combined["config"]["seeds"] == 4 and combined["config"]["methods"] == ["adamw", "epi"]
    assert [r["seed"] for r in combined["runs"]["epi"]] == [0, 1, 2, 3] and list(combined["paired"]) == ["epi - adamw"]
    paired = combined["paired"]["epi - adamw"]
    # EM over training: (2 - 1) * (s + 1) * (1 + 2 + 3) / 3 / 100; final EM: (2 - 1) * (s + 1) * 3 / 100
    assert paired["EM over training"]["diffs"] == pytest.approx([0.02, 0.04, 0.06, 0.08])
    assert paired["final average EM"]["diffs"] == pytest.approx([0.03, 0.06, 0.09, 0.12])
    assert paired["mean drop below best (lower is better)"]["diffs"] == pytest.approx([0, 0, 0, 0])  # never fell
    assert [c["seeds"] for c in combined["combined_from"]] == [[0, 1], [2, 3]]
    assert f"Combined from {paths[0]}: seeds 0-1" in text
    # its replication reruns the pooled seeds and compares with the environments the runs had
    combined_file = Path(combined["folder"]) / "results.json"
    again, _ = _toy(tmp_path, "r", "--replicate", str(combined_file))
    assert again["config"]["seeds"] == 4 and again["config"]["methods"] == ["adamw", "epi"]
    assert again["config"]["combine"] is None and again["config"]["replicate"] == str(combined_file)
    assert set(again["replication"]["environment_differences"]) == set(map(str, paths))


@pytest.mark.parametrize("change,message", [
    (lambda a, b: b["config"].update(lr=1.0), "only seeds and methods may differ"),
    (lambda a, b: b["runs"]["adamw"][0].update(seed=0), "seed 0 is in both"),
    (lambda a, b: b.update(experiment="forgetting"), "is not the results.json of a multitask or ablation run"),
    (lambda a, b: b.update(tasks=["x", "y"]), "on other tasks"),
    (lambda a, b: [b["runs"].pop("epi"), b["runs"].pop("adamw")], "fewer than two methods in common")])
def test_combine_refuses_runs_that_do_not_pair(tmp_path, capsys, change, message):
    results, _ = _toy(tmp_path, "a", "multitask", "--tiny", "--seeds", "1", "--steps", "8", "--methods", "adamw", "epi")
    other = json.loads(json.dumps(results))
    for r in (r for rs in other["runs"].values() for r in rs):
        r["seed"] = 7
    change(results, other)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(results))
    b.write_text(json.dumps(other))
    with pytest.raises(SystemExit) as e:
        main(["--combine", str(a), str(b), "--out", str(tmp_path / "runs")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
