"""Accelerators' data-sheet peaks, in one place for the training metrics and the benchmarks (no torch import)."""

# Dense bf16 tensor-core TFLOP/s and HBM GB/s from the vendors' data sheets, matched on the device name: the first
# key found in the name wins, so a specific model precedes its family ("H100 PCIe" before "H100").
GPU_PEAKS = {
    "H200": (989.0, 4800.0),
    "H100 SXM": (989.0, 3350.0),
    "H100 PCIe": (756.0, 2000.0),
    "H100": (989.0, 3350.0),
    "A100-SXM4-80GB": (312.0, 2039.0),
    "A100": (312.0, 1555.0),
    "L40S": (362.0, 864.0),
    "A10G": (70.0, 600.0),
}


def gpu_peaks(device_name: str):
    """(peak bf16 TFLOP/s, peak GB/s) of a GPU by name, or (None, None) when it is not in the table."""
    for key, peaks in GPU_PEAKS.items():
        if key.lower() in device_name.lower():
            return peaks
    return None, None
