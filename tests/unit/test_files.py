"""Atomic writes (files.py): what a reader sees while lorakit writes, and which copy stays."""

from lorakit import files


def test_write_once_keeps_the_first_finished_copy_and_never_swaps_it(tmp_path):
    """Two processes filling the same cache at once (the alias's conversion, llama.cpp's converter): the copy
    renamed first stays, the later one is dropped, and a finished folder is never written again."""
    target = tmp_path / "cache" / "model"
    with files.write_once(target, "config.json") as slow:
        with files.write_once(target, "config.json") as fast:
            (fast / "config.json").write_text("fast")
        assert (target / "config.json").read_text() == "fast", "renamed into place whole"
        (slow / "config.json").write_text("slow")
        (slow / "weights").write_text("slow")
    assert sorted(p.name for p in target.iterdir()) == ["config.json"], "the first finished copy, untouched"
    assert [p.name for p in target.parent.iterdir()] == ["model"], "no temporary folder left behind"
    with files.write_once(target, "config.json") as again:
        assert again is None, "already whole: nothing to write"


def test_write_once_replaces_an_incomplete_folder_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "half").write_text("left by hand")
    try:
        with files.write_once(target, "config.json") as tmp:
            (tmp / "config.json").write_text("x")
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (target / "half").is_file(), "untouched on failure"
    with files.write_once(target, "config.json") as tmp:
        (tmp / "config.json").write_text("whole")
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
