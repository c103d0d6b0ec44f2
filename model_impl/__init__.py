"""Model architectures written by hand on the backend's array module (NumPy or CuPy).

Each model takes the flattened varlen batch (no padding) and reaches its KV only through the paged
cache and the block tables in `AttentionMetadata`.
"""
from rawpaged.worker.model_runner import AttentionMetadata
from model_impl.llama import LlamaForCausalLM
from model_impl.opt import OPTForCausalLM

MODEL_REGISTRY = {
    "llama": LlamaForCausalLM,
    "opt": OPTForCausalLM,
}


def get_model_class(family: str):
    return MODEL_REGISTRY[family]


__all__ = ["AttentionMetadata", "LlamaForCausalLM", "OPTForCausalLM", "MODEL_REGISTRY", "get_model_class"]
