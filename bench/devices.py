"""Peak figures of known GPUs, by name: DRAM bandwidth (GB/s) and dense bf16 tensor-core throughput (TFLOP/s).

From the vendors' data sheets (dense, no sparsity). ``device_peaks(name)`` matches the first pattern contained in
a device name as ``torch.cuda.get_device_name`` gives it (e.g. "NVIDIA H100 80GB HBM3"); unknown cards get
``None`` figures and the benchmarks say "unknown" instead of a share of peak.
"""
from __future__ import annotations

# (substring of the device name, peak GB/s, peak dense bf16 TFLOP/s); more specific patterns first.
KNOWN_GPUS: tuple[tuple[str, float, float], ...] = (
    ("GH200", 4900, 989),  # the HBM3e (144 GB) one; the HBM3 (96 GB) one has 4000: a peak may only be overstated
    ("H200", 4800, 989), ("H100 NVL", 3900, 835), ("H100 PCIe", 2000, 756),
    ("H100", 3350, 989),  # SXM ("NVIDIA H100 80GB HBM3")
    ("B200", 8000, 2250), ("A100-SXM4-80GB", 2039, 312), ("A100 80GB PCIe", 1935, 312),
    ("A100-SXM4-40GB", 1555, 312), ("A100-PCIE-40GB", 1555, 312), ("A100", 1555, 312),
    ("L40S", 864, 362), ("L40", 864, 181), ("RTX 6000 Ada", 960, 364), ("RTX 4090", 1008, 165),
    ("RTX 3090", 936, 71), ("A6000", 768, 155), ("A10G", 600, 70), ("A10", 600, 125), ("L4", 300, 121),
    ("V100", 900, 0),  # no bf16 tensor cores
)


def device_peaks(name: str) -> dict:
    """``{"match": pattern or None, "bandwidth_gbs": float | None, "bf16_tflops": float | None}``."""
    for pattern, gbs, tflops in KNOWN_GPUS:
        if pattern.lower() in name.lower():
            return {"match": pattern, "bandwidth_gbs": float(gbs), "bf16_tflops": float(tflops) or None}
    return {"match": None, "bandwidth_gbs": None, "bf16_tflops": None}
