"""Tasks from DeepMind's mathematics-dataset generator, a character tokenizer, batches, exact match.

mathematics-dataset 1.0.1 (the PyPI release) imports ``base_solution_linear`` from
``sympy.solvers.diophantine``, a module that became a package in sympy 1.7; :func:`load_generators`
puts the name back before importing it (upstream issue google-deepmind/mathematics_dataset#14).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import random
import string
import sys
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

LEVELS = 3  # the generator's entropy range split in thirds; level 0 = the easiest third


def apply_sympy_shim() -> None:
    """Make ``from sympy.solvers.diophantine import base_solution_linear`` work on sympy >= 1.7."""
    pkg = importlib.import_module("sympy.solvers.diophantine")
    if not hasattr(pkg, "base_solution_linear"):
        pkg.base_solution_linear = importlib.import_module("sympy.solvers.diophantine.diophantine").base_solution_linear
    sys.modules["sympy.solvers.diophantine"] = pkg


@lru_cache(maxsize=None)
def load_generators(level: int = 0) -> dict:
    """{"module__task": generator} for the training modules at difficulty `level` (0 = easiest third)."""
    apply_sympy_shim()
    from mathematics_dataset.modules import modules  # noqa: PLC0415 - needs the shim first

    def entropy(r):
        lo, hi = r
        return lo + (hi - lo) * level / LEVELS, lo + (hi - lo) * (level + 1) / LEVELS

    return {f"{m}__{k}": fn for m, sub in modules.train(entropy).items() for k, fn in sub.items()}


@dataclass(frozen=True)
class Task:
    name: str
    train: tuple[tuple[str, str], ...]
    eval: tuple[tuple[str, str], ...]


def make_task(name: str, n_train: int, n_eval: int, seed: int, max_len: int, level: int = 0,
              cache_dir: str | Path | None = None) -> Task:
    """Question/answer pairs from one generator: a training pool and a held-out set of distinct
    questions never seen in training; pairs longer than `max_len` characters are dropped.

    With `cache_dir`, the pairs are read from (or written once to) a JSON file named by every input
    and the generator's and sympy's versions: generation takes seconds per task, a cached read
    milliseconds, and the pairs are the same either way."""
    path = _cache_path(cache_dir, name, n_train, n_eval, seed, max_len, level) if cache_dir else None
    if path is not None and path.exists():
        train, held = json.loads(path.read_text())
        return Task(name, tuple(map(tuple, train)), tuple(map(tuple, held)))
    task = _generate(name, n_train, n_eval, seed, max_len, level)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # parallel runs: whole files only
        tmp.write_text(json.dumps([task.train, task.eval]))
        tmp.replace(path)
    return task


def make_tasks(args) -> list[Task]:
    """The tasks of an experiment's arguments (task i generated with seed 1000 + i)."""
    return [make_task(name, args.pool, args.eval_items, seed=1000 + i, max_len=args.max_len, level=args.level,
                      cache_dir=args.cache_dir or None)
            for i, name in enumerate(args.tasks)]


def default_cache_dir() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "epi_kernels" / "tasks")


def _cache_path(cache_dir, name, n_train, n_eval, seed, max_len, level) -> Path:
    versions = "-".join(importlib.metadata.version(m) for m in ("mathematics-dataset", "sympy"))
    return Path(cache_dir) / f"{name}-level{level}-train{n_train}-eval{n_eval}-seed{seed}-len{max_len}-v{versions}.json"


def _generate(name: str, n_train: int, n_eval: int, seed: int, max_len: int, level: int) -> Task:
    fn = load_generators(level)[name]
    random.seed(seed)
    np.random.seed(seed)
    seen: set[str] = set()
    pairs: list[tuple[str, str]] = []
    tries = 0
    while len(pairs) < n_train + n_eval and tries < 20 * (n_train + n_eval):
        tries += 1
        p = fn()
        q, a = str(p.question), str(p.answer)
        if q in seen or len(q) + len(a) + 3 > max_len:
            continue
        seen.add(q)
        pairs.append((q, a))
    if len(pairs) < n_train + n_eval:
        raise RuntimeError(f"task {name}: only {len(pairs)} distinct examples of <= {max_len} characters")
    return Task(name, tuple(pairs[n_eval:]), tuple(pairs[:n_eval]))


LEARNED_MARGIN = 0.05  # EM above the majority-answer baseline below which a task counts as barely learned


def majority_baseline(task: Task) -> float:
    """Exact match of always answering the training pool's most common answer: what a model that
    learned nothing about the questions reaches (a task is learned only well above it)."""
    answers = Counter(a for _, a in task.train)
    top = answers.most_common(1)[0][0] if answers else None
    return sum(a == top for _, a in task.eval) / max(len(task.eval), 1)


class CharTokenizer:
    """One token per printable character plus PAD, BOS, SEP (question/answer) and EOS."""

    PAD, BOS, SEP, EOS = 0, 1, 2, 3

    def __init__(self) -> None:
        self.chars = sorted(set(string.printable) - set("\t\n\r\x0b\x0c"))
        self.index = {c: i + 4 for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 4

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i - 4] for i in ids if i >= 4)

    def batch(self, pairs, device="cpu") -> dict[str, torch.Tensor]:
        """input_ids, attention_mask and labels (answer characters and EOS only; -100 elsewhere)."""
        seqs, answer_starts = [], []
        for q, a in pairs:
            head = [self.BOS, *self.encode(q), self.SEP]
            seqs.append(head + self.encode(a) + [self.EOS])
            answer_starts.append(len(head))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.PAD, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        for i, (s, start) in enumerate(zip(seqs, answer_starts)):
            ids[i, :len(s)] = torch.tensor(s)
            labels[i, start:len(s)] = ids[i, start:len(s)]
        return {"input_ids": ids.to(device), "attention_mask": (ids != self.PAD).long().to(device),
                "labels": labels.to(device)}


class PromptTokenizer:
    """The CharTokenizer interface over a pretrained model's tokenizer: "Question: q\nAnswer: a<eos>",
    with the loss on the answer tokens and EOS (for --model smollm2)."""

    def __init__(self, hf_tokenizer) -> None:
        self.tok = hf_tokenizer

    def batch(self, pairs, device="cpu") -> dict[str, torch.Tensor]:
        seqs, starts = [], []
        for q, a in pairs:
            head = self.tok.encode(f"Question: {q}\nAnswer:", add_special_tokens=False)
            seqs.append(head + self.tok.encode(f" {a}", add_special_tokens=False) + [self.tok.eos_token_id])
            starts.append(len(head))
        width = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), width), self.tok.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for i, (x, start) in enumerate(zip(seqs, starts)):
            ids[i, :len(x)] = torch.tensor(x)
            labels[i, start:len(x)] = ids[i, start:len(x)]
            mask[i, :len(x)] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def heldout_text(n_chunks: int, chars: int = 600) -> list[str]:
    """Real English the experiments never train on: CPython's pydoc topics (a fixed selection)."""
    from pydoc_data.topics import topics  # noqa: PLC0415 - in the standard library

    texts = [topics[k].strip() for k in sorted(topics)]
    chunks = [t[i:i + chars] for t in texts for i in range(0, len(t) - chars + 1, chars)]
    step = max(1, len(chunks) // n_chunks)
    return chunks[::step][:n_chunks]


@torch.no_grad()
def mean_nll(model, hf_tokenizer, texts: list[str], max_tokens: int = 128) -> float:
    """Mean next-token negative log-likelihood (nats per token) of `texts`."""
    model.eval()
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([hf_tokenizer.encode(text, add_special_tokens=False)[:max_tokens]],
                           device=next(model.parameters()).device)
        out = model(input_ids=ids, labels=ids)
        total += out.loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    model.train()
    return total / count


@torch.no_grad()
def exact_match(model, tokenizer: CharTokenizer, pairs, batch_size: int = 128) -> float:
    """Fraction of pairs whose every answer token (EOS included) is the model's argmax given the
    gold prefix: in one forward pass, the same as exact match of greedy decoding."""
    model.eval()
    hits = 0
    for i in range(0, len(pairs), batch_size):
        b = tokenizer.batch(pairs[i:i + batch_size], next(model.parameters()).device)
        pred = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].argmax(-1)
        gold = b["labels"][:, 1:]
        ok = (pred == gold) | (gold == -100)
        hits += int(ok.all(dim=1).sum())
    model.train()
    return hits / len(pairs)
