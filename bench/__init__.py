"""Benchmarks of ComfyUI-AccVideo: ``python -m bench`` (CPU suite), ``python -m bench.gpu`` (one CUDA GPU)."""
