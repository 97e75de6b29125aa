import pytest

from sedvae.fileio import atomic_path, write_json_atomic


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    out = tmp_path / "a.json"
    write_json_atomic(out, {"b": 1, "a": 2.5})
    write_json_atomic(out, {"c": 3})
    assert out.read_text() == '{\n  "c": 3\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path):
    out = tmp_path / "a.txt"
    out.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert out.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_written_file_gets_the_usual_mode(tmp_path):
    import os

    out = write_json_atomic(tmp_path / "m.json", {})
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask
