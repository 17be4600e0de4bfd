"""Telemetry: request ids, log formats and traces.

Owns: the ``x-request-id`` of each request (taken or made, returned, readable anywhere on
its path), the log set-up (text or JSON lines, vLLM's loggers included) and the optional
OpenTelemetry tracer. Does not know: routes, engines or the store (they read the request id
and open spans through this package).
"""
