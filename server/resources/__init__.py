"""Hardware and what each engine and the trainer get of it: the platform (CPU, or CUDA
devices and their memory), vLLM's platform defaults, sizes read from checkpoints, and the
resource plan checked before any engine starts.

Owns: every decision that depends on the platform, as plain functions of an injected
``Platform`` (so tests cover CUDA on a machine without one); ``detect()`` is the only code
here that asks the hardware.
Does not know: vLLM (it hands the engine plain arguments and environment), HTTP, SQL,
the models file's schema (callers pass plain demands).
"""
