"""The in-process training module: CUT data, loss and trainer, LoRA merges, the online loop
(``online``: one iteration's export, worker and hot-load; ``service``: the loop as the
server runs it).

Imports torch, transformers and peft lazily (inside functions) so the serving path never
pays for them; never imports vllm.
"""
