"""Who may call and how much: API keys and the admin key, per-engine admission
(backpressure), per-key rate limits, request size limits, draining on shutdown.

Owns: the decisions to let a request through or refuse it (401/403/413/429/431/503), made
before any work is done. Does not know: models, engines, the store, templates.
"""
