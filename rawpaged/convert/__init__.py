"""Converters that turn other checkpoint formats into Hugging Face-style model directories.

The engine reads only Hugging Face directories (config.json + safetensors + tokenizer files);
everything else is converted once, up front, by a module in this package.
"""
from rawpaged.convert.llama2c import convert_llama2c, llama2c_tokenizer_json

__all__ = ["convert_llama2c", "llama2c_tokenizer_json"]
