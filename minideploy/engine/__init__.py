"""Chapter 6's engine; for now the static-batching generator and the LMDeploy-shaped API."""
from .generator import Generator, SequenceState
from .pipeline import Pipeline, Response, pipeline
from .turbomind import EngineOutput, TurboMind, TurboMindInstance

__all__ = ["EngineOutput", "Generator", "Pipeline", "Response", "SequenceState", "TurboMind",
           "TurboMindInstance", "pipeline"]
