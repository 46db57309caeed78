"""Draft-then-verify decoding: the engine, its KV cache, the verifiers and the records it yields."""

from onspec.engine.engine import EngineConfig, Request, RunningBatch, SpeculativeEngine
from onspec.engine.records import RequestOutput, RequestStats, StepRecord
from onspec.engine.sampling import SamplingParams

__all__ = ["EngineConfig", "Request", "RequestOutput", "RunningBatch", "RequestStats", "SamplingParams", "SpeculativeEngine", "StepRecord"]
