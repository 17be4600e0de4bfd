"""Front ends of one cluster serve the same adapters: what one loads or unloads, the
others list (``models.served_list``), checked with two registries on one adapters root and
a stand-in engine (the replicas' side is in ``test_cluster_ray``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from server.engine.types import AdapterRef
from server.errors import ModelNotFound
from server.models.adapter_meta import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from server.models.models_file import ModelEntry
from server.models.registry import Registry, ServedModel
from server.models.served_list import ServedList


class Replicas:
    """The engine side: a Ray engine that checks nothing (the test is about the lists)."""

    lora_enabled = True
    max_lora_rank = 16

    def __init__(self) -> None:
        self.added: list[AdapterRef] = []

    async def add_adapter(self, ref: AdapterRef) -> None:
        self.added.append(ref)

    async def remove_adapter(self, ref: AdapterRef) -> None:
        return None


def front_end(root: Path) -> tuple[Registry, Replicas]:
    registry = Registry(root)
    engine = Replicas()
    registry.register(
        ServedModel(
            entry=ModelEntry(name="base", path="builtin:smollm2-135m-instruct"),
            path="/models/base",
            renderer=SimpleNamespace(family="chat"),  # type: ignore[arg-type]
            engine=engine,  # type: ignore[arg-type]
        )
    )
    registry.served_list = ServedList(root, "test")
    return registry, engine


def adapter_folder(root: Path, name: str) -> None:
    folder = root / name
    folder.mkdir()
    (folder / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (folder / ADAPTER_WEIGHTS).write_bytes(b"weights")


def test_what_one_front_end_loads_every_front_end_lists(tmp_path: Path) -> None:
    adapter_folder(tmp_path, "a1")
    adapter_folder(tmp_path, "a2")
    first, first_engine = front_end(tmp_path)
    second, second_engine = front_end(tmp_path)

    async def scenario() -> None:
        await first.load_adapter("tuned", "a1", base="base")
        assert first_engine.added and not second_engine.added  # checked on one replica
        served = second.get("tuned")  # a look-up finds it
        assert served.parent == "base" and served.adapter == first.get("tuned").adapter
        await second.load_adapter("other", "a2", base="base")  # both write the list
        assert {m.name for m in first.served()} == {"base", "tuned", "other"}
        assert first.get("tuned").adapter is not None  # the first looks it up...
        await second.unload_adapter("tuned")
        with pytest.raises(ModelNotFound):  # ...and no longer once the second unloaded it
            first.get("tuned")
        assert "tuned" not in {m.name for m in first.served()}
        # A front end started later serves what the others serve.
        third, _ = front_end(tmp_path)
        assert {m.name for m in third.served()} == {"base", "other"}

    asyncio.run(scenario())
