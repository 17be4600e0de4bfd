"""aligngate: a vLLM-backed, OpenAI-compatible serving gateway for aligned checkpoints."""

__version__ = "0.1.0"
