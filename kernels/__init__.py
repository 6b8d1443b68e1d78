"""cancerllm.kernels: attention, RMSNorm and cross-entropy ops (DESIGN.md, "Public API").

The reference implementations in `reference.py` serve every device for now; the Triton kernels take over on
CUDA tensors once they land, and `CANCERLLM_KERNELS=triton|torch` forces one path.
"""
from .reference import attention, cross_entropy, linear_cross_entropy, rms_norm

__all__ = ["attention", "rms_norm", "cross_entropy", "linear_cross_entropy"]
