"""Model architectures written by hand on the backend's array module (NumPy or CuPy).

Each model takes the flattened varlen batch (no padding) and reaches its KV only through the paged
cache and the block tables in `AttentionMetadata`. One file per family; the architectures each
family serves are `rawpaged.config.ARCHITECTURES` (the one table, shared with the converter).
"""
from rawpaged.worker.model_runner import AttentionMetadata
from model_impl.gemma import GemmaForCausalLM
from model_impl.gpt2 import GPT2LMHeadModel
from model_impl.gpt_neox import GPTNeoXForCausalLM
from model_impl.llama import LlamaForCausalLM
from model_impl.opt import OPTForCausalLM
from model_impl.phi3 import Phi3ForCausalLM
from model_impl.qwen import Qwen2ForCausalLM, Qwen3ForCausalLM

# family (rawpaged.config.ARCHITECTURES' values) -> its implementation
MODEL_REGISTRY = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "gemma": GemmaForCausalLM,
    "phi3": Phi3ForCausalLM,
    "gpt2": GPT2LMHeadModel,
    "gpt_neox": GPTNeoXForCausalLM,
    "opt": OPTForCausalLM,
}


def get_model_class(family: str):
    return MODEL_REGISTRY[family]


__all__ = ["AttentionMetadata", "MODEL_REGISTRY", "get_model_class", "LlamaForCausalLM", "OPTForCausalLM",
           "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM", "Phi3ForCausalLM", "GPT2LMHeadModel",
           "GPTNeoXForCausalLM"]
