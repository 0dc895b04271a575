"""Helpers shared by the test suite (importable as `support.*`: pyproject.toml puts tests/ on
sys.path). Not tests: pytest collects nothing here.

- devices: where the kernel backends' tests run (parametrisations with their skip reasons)
- gradients: gradient tensors for the backend parity tests
- score_inputs: score tensors and the float oracle for threshold tests
- large_histograms: window histograms with counts beyond 2**31 and the reference engine's answer
- build: setup.py as a module, cuobjdump, and the release wheel (.ci/build-wheel) built once a session
- triton_aot: ahead-of-time compilation of every Triton kernel variant (run as a script)
- deepspeed_worker, deepspeed_trainer_worker: one rank of the DeepSpeed tests (run by torchrun)
- legacy_checkpoint (and data/): checkpoints of an earlier version, and what it did after resuming
"""
