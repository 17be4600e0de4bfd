"""The four families' reference checkpoints, by the numbers of their published
``config.json``, and the sizing table the GPU deployments page shows (``aligngate check --sizing``).

Sources: Llama-2-13b-chat-hf and Mistral-7B-Instruct-v0.2 (copies of their gated configs),
m-a-p/CT-LLM-SFT-DPO, EleutherAI/gpt-j-6b (n_inner null → 4 × n_embd).
"""

from __future__ import annotations

from typing import Any

from server.resources.plan import EngineDemand, TrainingDemand, make_plan
from server.resources.platform import GIB, assumed_gpus
from server.resources.sizing import ModelShape, shape_from_config, training_memory

_LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
REFERENCE_CONFIGS: dict[str, dict[str, Any]] = {
    "LLaMA2-13B (CUT)": {
        **_LLAMA, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
        "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000,
        "max_position_embeddings": 4096, "tie_word_embeddings": False,
        "torch_dtype": "float16",
    },
    "Mistral-7B (KTO)": {
        "model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    "CT-LLM-2B (DPO)": {
        **_LLAMA, "hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 32,
        "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 125824,
        "max_position_embeddings": 4096, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "GPT-J-6B (Quark)": {
        "model_type": "gptj", "architectures": ["GPTJForCausalLM"], "n_embd": 4096,
        "n_layer": 28, "n_head": 16, "n_inner": None, "rotary_dim": 64, "vocab_size": 50400,
        "n_positions": 2048, "tie_word_embeddings": False, "torch_dtype": "float32",
    },
}  # fmt: skip

# The serving context the table assumes: the checkpoints' own lengths up to 4,096 tokens.
SERVED_LEN = 4096


def reference_shapes() -> dict[str, ModelShape]:
    return {name: shape_from_config(config) for name, config in REFERENCE_CONFIGS.items()}


def _demand(name: str, shape: ModelShape, lora: bool) -> EngineDemand:
    return EngineDemand(
        name=name,
        weights_bytes=shape.parameters() * 2,
        kv_bytes_per_token=shape.kv_bytes_per_token(2),
        max_model_len=min(shape.max_position, SERVED_LEN),
        lora_slots=2 if lora else 0,
        lora_slot_bytes=shape.lora_slot_bytes(16, 2) if lora else 0,
    )


def sizing_rows(cards_gib: tuple[int, ...] = (24, 48, 80)) -> list[dict[str, Any]]:
    """Per reference model and card: does it serve alone (bf16, its own length up to 4,096,
    LoRA on where vLLM has it), and does it serve with the CUT training reserve beside it
    (with and without gradient checkpointing)? KV tokens are what the share leaves."""
    rows = []
    for name, shape in reference_shapes().items():
        lora = not shape.is_gptj  # vLLM has no LoRA for GPT-J
        demand = _demand(name, shape, lora)
        row: dict[str, Any] = {
            "model": name,
            "parameters_b": round(shape.parameters() / 1e9, 2),
            "weights_gib": round(demand.weights_bytes / GIB, 1),
            "kv_mib_per_1k_tokens": round(demand.kv_bytes_per_token * 1000 / 2**20),
        }
        for checkpointing in (False, True):
            memory = training_memory(shape, dtype_bytes=2, gradient_checkpointing=checkpointing)
            row[f"train_gib{'_gc' if checkpointing else ''}"] = round(memory.total / GIB, 1)
        for card in cards_gib:
            alone = make_plan([demand], assumed_gpus(card, ram_gib=64))
            row[f"{card}_alone"] = alone.engines[0].kv_tokens if alone.ok else None
            for checkpointing in (False, True):
                memory = training_memory(shape, dtype_bytes=2, gradient_checkpointing=checkpointing)
                training = TrainingDemand(device="cuda:0", needed_bytes=memory.total, model=name)
                both = make_plan([demand], assumed_gpus(card, ram_gib=64), training=training)
                key = f"{card}_train{'_gc' if checkpointing else ''}"
                row[key] = both.engines[0].kv_tokens if both.ok and both.engines else None
        rows.append(row)
    return rows


def sizing_markdown(cards_gib: tuple[int, ...] = (24, 48, 80)) -> str:
    def cell(tokens: int | None) -> str:
        return "—" if tokens is None else f"{tokens / 1000:.0f}k"

    head = "| model | params | bf16 weights | KV / 1k tokens | CUT training (GC) |"
    rule = "|---|---|---|---|---|"
    for card in cards_gib:
        head += f" {card} GB: serve | + train | + train (GC) |"
        rule += "---|---|---|"
    lines = [head, rule]
    for row in sizing_rows(cards_gib):
        line = (
            f"| {row['model']} | {row['parameters_b']}B | {row['weights_gib']} GiB | "
            f"{row['kv_mib_per_1k_tokens']} MiB | {row['train_gib']} ({row['train_gib_gc']}) GiB |"
        )
        for card in cards_gib:
            line += (
                f" {cell(row[f'{card}_alone'])} | {cell(row[f'{card}_train'])} |"
                f" {cell(row[f'{card}_train_gc'])} |"
            )
        lines.append(line)
    return "\n".join(lines)
