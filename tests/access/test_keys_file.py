"""The keys file on its own (no stack): concurrent edits lose nothing, keys are stored hashed, a malformed
file names the field and keeps the last good table loaded."""

from __future__ import annotations

import threading

import pytest

from unclip.access import keys


def test_concurrent_creates_lose_no_key_and_store_only_hashes(tmp_path):
    path = tmp_path / "keys.yaml"
    made: list[str] = []
    threads = [
        threading.Thread(target=lambda i=i: made.append(keys.create(path, f"k{i}"))) for i in range(16)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys.load(path).keys) == 16
    text = path.read_text()
    assert not any(key in text for key in made)
    store = keys.KeyStore(path)
    assert all(store.by_key(key) is not None for key in made)
    assert path.stat().st_mode & 0o077 == 0  # readable by its owner only


def test_a_malformed_file_names_the_field_and_the_store_keeps_the_last_good_table(tmp_path):
    path = tmp_path / "keys.yaml"
    key = keys.create(path, "good")
    store = keys.KeyStore(path, check_interval_s=0.0)
    with pytest.raises(keys.KeysFileError, match=r"keys\[0\]\.priority"):
        keys.parse("keys: [{name: a, tenant: t, sha256: '" + "0" * 64 + "', priority: urgent}]")
    path.write_text("keys: [{name: a}]")  # tenant missing
    assert store.by_key(key) is not None and store.by_key(key).name == "good"
