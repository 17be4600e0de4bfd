"""The models being served: the models file, the registry of running engines and adapters,
the prompt families and their rendering, the embedded default model, adapter files and
their metadata.

Owns: which name maps to which engine, adapter and renderer; what prompt text and token ids
a conversation becomes. Does not know: HTTP, SQL, training (it reads the adapter metadata
that training writes; ``adapter_meta`` lives here because both need it).
"""
