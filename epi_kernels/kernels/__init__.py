"""Triton kernels of the "triton" backend: one module per kernel, plus the shared integer helpers.

Importing this package imports Triton; :mod:`epi_kernels.kernel_sets.triton_kernels` is the only importer and
is itself loaded only when a step runs with ``backend="triton"``. On CPU tensors the kernels need
``TRITON_INTERPRET=1`` in the environment before this package is first imported.
"""
