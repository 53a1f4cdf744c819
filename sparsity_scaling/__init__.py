"""sparsity-scaling: measure and predict activation sparsity in large language models."""

import warnings

# megatron-core warns on import when NVIDIA's optional fused kernels are absent (always on CPU).
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
