"""rawpaged: an LLM serving engine doing PagedAttention without PyTorch."""
from rawpaged.errors import RawpagedError
from rawpaged.outputs import CompletionOutput, RequestOutput
from rawpaged.sampling_params import SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"


def __getattr__(name):
    # NOTE: lazy, so `import rawpaged` (the CLI's --help, the converters) does not load Numba.
    if name == "LLM":
        from rawpaged.llm import LLM
        return LLM
    if name == "LLMEngine":
        from rawpaged.engine import LLMEngine
        return LLMEngine
    raise AttributeError(name)


__all__ = ["LLM", "LLMEngine", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput",
           "RawpagedError"]
