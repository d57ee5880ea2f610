"""Triton kernels, each beside a pure-torch reference of the same signature (used on CPU and by the tests)."""
