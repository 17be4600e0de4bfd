"""The models file: what it accepts, what it refuses, and how paths resolve."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.models.models_file import BUILTIN_DEFAULT, ModelsFileError, load_models_file


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


def test_entries_with_engine_arguments(tmp_path: Path) -> None:
    entries = load_models_file(
        write(
            tmp_path,
            """
models:
  - name: smollm2
    path: builtin:smollm2-135m-instruct
    max_model_len: 2048
    dtype: bfloat16
    engine_args: {max_num_seqs: 32}
  - name: local
    path: checkpoints/tiny
""",
        )
    )
    assert [e.name for e in entries] == ["smollm2", "local"]
    assert entries[0].path == BUILTIN_DEFAULT
    assert entries[0].max_model_len == 2048
    assert entries[0].engine_args == {"max_num_seqs": 32}
    # Relative paths resolve against the models file's folder.
    assert entries[1].path == str(tmp_path / "checkpoints" / "tiny")
    assert entries[1].trust_remote_code is False


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("models: []", "at least 1"),
        ("models:\n  - {name: a, path: x}\n  - {name: a, path: y}", "duplicate model name"),
        ("models:\n  - {name: a, path: x, colour: blue}", "colour"),
        ("models:\n  - {name: a, path: x, engine_args: {max_model_len: 5}}", "entry fields"),
        ("models:\n  - {name: 'bad name', path: x}", "should match pattern"),
        ("models:\n  - {name: a, path: x, family: astrology}", "family"),
        ("models: [", "cannot read"),
    ],
)
def test_invalid_models_files_are_refused_clearly(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ModelsFileError) as caught:
        load_models_file(write(tmp_path, text))
    assert needle in str(caught.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelsFileError, match="cannot read models file"):
        load_models_file(tmp_path / "absent.yaml")


def test_promotions_are_kept_in_the_adapters_root(tmp_path: Path) -> None:
    from server.models.aliases import AliasBook, base_of_alias, latest_alias

    assert latest_alias("m") == "m@latest" and base_of_alias("m@latest") == "m"
    assert base_of_alias("m") is None and base_of_alias("@latest") is None
    assert base_of_alias("m@v2") is None
    book = AliasBook(tmp_path / "promotions.json")
    book.set("m@latest", "m", by="start")
    assert not (tmp_path / "promotions.json").exists()  # the start-up default is not written
    assert book.set("m@latest", "m-iter1", by="gate", reason="won 20-4") == "m"
    again = AliasBook(tmp_path / "promotions.json")
    assert again.saved() == {"m@latest": "m-iter1"}
    (tmp_path / "promotions.json").write_text("{not json")
    assert again.saved() == {}  # unreadable: ignored with a warning, the bases serve


def test_front_ends_sharing_the_root_see_each_others_promotions(tmp_path: Path) -> None:
    """Two front ends of one cluster: what one promotes, the other serves at its next
    look-up; promotions of two aliases at once both land (each reads under the lock)."""
    import threading

    from server.models.aliases import AliasBook

    path = tmp_path / "promotions.json"
    first, second = AliasBook(path), AliasBook(path)
    for book in (first, second):
        book.set("a@latest", "a", by="start")
        book.set("b@latest", "b", by="start")
    assert not second.sync()  # no file yet: nothing to take up
    first.set("a@latest", "a-iter1", by="gate")
    assert second.sync() and second.resolve("a@latest") == "a-iter1"
    assert [p.by for p in second.history("a@latest")] == ["start", "gate"]  # the file's
    assert not second.sync()  # unchanged: one stat, no read
    # Only versions this front end serves are taken up.
    first.set("b@latest", "b-iter9", by="admin")
    assert second.sync(lambda version: version != "b-iter9")
    assert second.resolve("b@latest") == "b"

    both = threading.Barrier(2)

    def promote(book: AliasBook, alias: str, version: str) -> None:
        both.wait()
        book.set(alias, version, by="gate")

    threads = [
        threading.Thread(target=promote, args=(first, "a@latest", "a-iter2")),
        threading.Thread(target=promote, args=(second, "b@latest", "b-iter2")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert AliasBook(path).saved() == {"a@latest": "a-iter2", "b@latest": "b-iter2"}


def test_adapter_ids_are_stable_and_follow_the_files(tmp_path: Path) -> None:
    """Engines cache a LoRA by its id: every front end (and a restarted one) must give the
    same adapter the same id, and changed files a new one."""
    import os

    from server.models.adapter_files import adapter_id
    from server.models.adapter_meta import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    folder = tmp_path / "a"
    folder.mkdir()
    (folder / ADAPTER_CONFIG).write_text("{}")
    (folder / ADAPTER_WEIGHTS).write_bytes(b"weights")
    first = adapter_id("a", folder)
    assert first == adapter_id("a", folder) and 0 < first < 2**31
    assert adapter_id("b", folder) != first
    stat = (folder / ADAPTER_WEIGHTS).stat()
    os.utime(folder / ADAPTER_WEIGHTS, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert adapter_id("a", folder) != first  # retrained in place: not the cached weights
