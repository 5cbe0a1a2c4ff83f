"""The layer between a trainer and many engines: routing, sticky sessions, pause/resume, failover.

    from skyrl_backends.client import InferenceEngineClient
    client = InferenceEngineClient([create_engine("transformers", model=path) for _ in range(2)])
    out = await client.generate(prompts, {"max_generate_length": 64}, session_ids=sessions)
"""

from skyrl_backends.client.client import EngineStats, InferenceEngineClient, is_engine_failure
from skyrl_backends.client.continuation import Continuation
from skyrl_backends.client.hashing import ConsistentHashRing, stable_hash
from skyrl_backends.client.recovery import EngineRecovery, Recovered
from skyrl_backends.client.routing import LoadTracker, Router, reassemble

__all__ = ["ConsistentHashRing", "Continuation", "EngineRecovery", "EngineStats", "InferenceEngineClient",
           "LoadTracker", "Recovered", "Router", "is_engine_failure", "reassemble", "stable_hash"]
