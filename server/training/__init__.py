"""The in-process training module: the four methods (CUT's own loss, KTO and DPO on TRL's
trainers, Quark as ALT trains it) in one ``Trainer`` loop (``arguments``, ``loop``,
``methods``), LoRA merges, the online loop (``online``: one iteration's export, worker and
hot-load; ``service``: the loop as the server runs it).

Imports torch, transformers, peft and trl lazily (inside functions) so the serving path never
pays for them; never imports vllm.
"""
