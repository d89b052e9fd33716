"""minideploy: a small, readable LLM inference engine that follows LMDeploy (TurboMind)."""
from .config import EngineConfig, GenerationConfig, ModelConfig
from .engine import EngineOutput, Pipeline, Response, TurboMind, pipeline

__version__ = "0.1.0"

__all__ = ["EngineConfig", "EngineOutput", "GenerationConfig", "ModelConfig", "Pipeline", "Response",
           "TurboMind", "pipeline", "__version__"]
