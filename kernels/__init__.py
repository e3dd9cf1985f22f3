"""Triton kernels and their launchers (installed as ``stitchops.kernels``).

Importing this package imports triton; ``stitchops`` only does so lazily, when the triton
backend is chosen for a call.
"""
