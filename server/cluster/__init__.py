"""Scale-out on Ray Serve: each served model a Ray Serve deployment whose replicas run the
project's own engine (``engine.vllm_engine``), reached from the front end through Ray
Serve's deployment handles. The only package that imports Ray.

Owns: the models file's `cluster:` schema, the deployment options (replicas, autoscaling,
per-replica resources), the replica class, and ``RayEngine`` — the front end's stand-in
for a local ``VllmEngine`` (token ids in, deltas out, plus which replica served).
Does not know: templates, tokenizers, HTTP, the store. Routing, health checks, restarts
and autoscaling are Ray Serve's; nothing here re-implements them.
"""
