"""Tiny randomly initialised checkpoints of each family's real architecture, built in the
test session as stand-ins for the 2B–13B checkpoints (head_dim 64: vLLM's CPU attention
rejects smaller heads). Tokenizers are copies of SmolLM2's, given each family's special
tokens, or (kinds ``llama-spm``, ``gptj-gpt2``) the real LLaMA SentencePiece and GPT-2 BPE
vocabularies under the test data (32,000 and 50,257 tokens; ``tokenizers/README.md``)."""

from __future__ import annotations

from pathlib import Path

QUANTILE_TOKENS = [f"_QUANTILE_TOKEN_{k}_" for k in range(5)]

# A Llama-2-style chat template (BOS written by the template, text trimmed), standing in
# for a DPO checkpoint's own template.
LLAMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<<SYS>>\n{{ message['content'] | trim }}\n<</SYS>>\n\n"
    "{% elif message['role'] == 'user' %}[INST] {{ message['content'] | trim }} [/INST]"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] | trim }} {{ eos_token }}"
    "{% endif %}{% endfor %}"
)


def _tokenizer(source: Path, kind: str):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(source))
    tok.chat_template = None
    if kind == "llama-spm":  # the real vocabulary as it is: <unk> <s> </s>
        return tok
    if kind in ("gptj", "gptj-gpt2"):
        tok.add_tokens(QUANTILE_TOKENS, special_tokens=True)
        tok.add_special_tokens(
            {
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            }
        )
    else:
        tok.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>"})
        tok.add_tokens(["<|user|>", "<|assistant|>"], special_tokens=False)
    if kind == "chat":
        tok.chat_template = LLAMA2_CHAT_TEMPLATE
    return tok


def _config(kind: str, vocab_size: int, tok):  # type: ignore[no-untyped-def]
    from transformers import GPTJConfig, LlamaConfig, MistralConfig

    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    if kind in ("gptj", "gptj-gpt2"):
        return GPTJConfig(
            vocab_size=vocab_size,
            n_positions=2048,
            n_embd=128,
            n_layer=2,
            n_head=2,
            rotary_dim=32,
            tie_word_embeddings=False,
            **ids,
        )
    common = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        **ids,
    )
    if kind == "mistral":
        return MistralConfig(sliding_window=None, **common)
    return LlamaConfig(**common)


def build(source_tokenizer: Path, out: Path, kind: str, seed: int = 0) -> Path:
    """kind: llama (CUT) | mistral (KTO) | gptj (Quark) | chat (DPO, Llama + chat template);
    llama-spm (CUT) | gptj-gpt2 (Quark) with ``source_tokenizer`` a real vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    tok = _tokenizer(source_tokenizer, kind)
    vocab_size = (len(tok) + 63) // 64 * 64
    config = _config({"chat": "llama", "llama-spm": "llama"}.get(kind, kind), vocab_size, tok)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out
