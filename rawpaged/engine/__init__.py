"""The engine: requests in, scheduled steps, RequestOutputs out (llm_engine.py), its options
(config.py), output processing (output_processor.py) and statistics (stats.py)."""
from rawpaged.engine.llm_engine import EngineConfig, LLMEngine

__all__ = ["EngineConfig", "LLMEngine"]
