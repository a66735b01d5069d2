"""Benchmarks behind `spd bench`: inference timing against the dense baseline (`inference`), the
training step (`train_step`) and the ONNX Runtime rows (`onnx`)."""

from spd.bench.inference import bf16_matmul_floor, format_bench, run_bench, save_plot, write_json

__all__ = ["bf16_matmul_floor", "format_bench", "run_bench", "save_plot", "write_json"]
