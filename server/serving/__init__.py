"""The OpenAI request path: chat and text completions, their engine streams, SSE frames.

Owns: turning a validated request (``server.protocol``) into rendered token ids for the
engine and the engine's deltas into OpenAI responses or stream chunks, admission slots
per request, completion records for the store.
Does not know: SQL (``store``), vLLM (``engine``), who the caller is (``guards``), routes.
"""
