"""Draft-then-verify decoding: the engine, its KV cache, the verifiers and the records it yields."""

from onspec.engine.engine import EngineConfig, Request, SpeculativeEngine
from onspec.engine.records import Example, RequestOutput, RequestStats, StepOutput, StepRecord
from onspec.engine.sampling import SamplingParams

__all__ = ["EngineConfig", "Example", "Request", "RequestOutput", "RequestStats", "SamplingParams",
           "SpeculativeEngine", "StepOutput", "StepRecord"]
