"""Triton kernels, one module per op family. Imported only where Triton is installed."""
