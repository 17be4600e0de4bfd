"""The in-process training module: CUT loss and trainer, LoRA merges, the online loop.

Imports torch, transformers and peft lazily (inside functions) so the serving path never
pays for them; never imports vllm.
"""
