"""The inference engine: the only package that imports vLLM.

Knows token ids and sampling parameters; knows nothing of templates or HTTP.
"""

from server.engine.types import (
    AdapterRef,
    ChoiceDelta,
    EngineStats,
    SamplingSpec,
    TokenLogprob,
    TopLogprob,
)

__all__ = ["AdapterRef", "ChoiceDelta", "EngineStats", "SamplingSpec", "TokenLogprob", "TopLogprob"]
