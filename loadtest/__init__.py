"""Load generator and benchmark harness for OpenAI-compatible servers (HTTP only).

Imports nothing from ``server/``: it measures the gateway exactly as it measures raw vLLM.
"""
