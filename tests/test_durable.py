"""durable: every file ddptrain writes is written whole or not at all, and never through a symbolic
link, whoever planted one and wherever it points."""

import errno
import os

import pytest

from ddptrain import durable


@pytest.fixture
def victim(tmp_path):
    """A file outside the folder written to, which a planted link points to."""
    path = tmp_path / "victim"
    path.write_bytes(b"precious\n")
    return path


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "folder"
    path.mkdir()
    return path


def test_a_whole_file_replaces_a_link_at_its_name_and_leaves_the_file_it_pointed_to_untouched(
        folder, victim):
    (folder / "config.json").symlink_to(victim)
    durable.write_atomically(folder / "config.json", b"{}\n")
    assert victim.read_bytes() == b"precious\n"
    assert not (folder / "config.json").is_symlink()
    assert (folder / "config.json").read_bytes() == b"{}\n"


def test_links_planted_at_the_temporary_names_of_the_next_pids_are_never_written_through(
        folder, victim):
    pid = os.getpid()
    planted = [folder / f".c.h5.tmp-{p}" for p in range(pid - 5, pid + 200)]
    for link in planted:
        link.symlink_to(victim)
    durable.write_atomically(folder / "c.h5", b"checkpoint")
    assert victim.read_bytes() == b"precious\n"
    assert all(link.is_symlink() for link in planted)
    assert (folder / "c.h5").read_bytes() == b"checkpoint"


def test_the_temporary_name_differs_at_every_write_and_none_is_left_behind(folder, monkeypatch):
    sources = []
    real_replace = os.replace
    monkeypatch.setattr(durable.os, "replace",
                        lambda a, b: (sources.append(os.path.basename(a)), real_replace(a, b)))
    for _ in range(3):
        durable.write_atomically(folder / "c.h5", b"x")
    assert len(set(sources)) == 3
    assert all(name.startswith(".c.h5.tmp-") for name in sources)
    assert os.listdir(folder) == ["c.h5"]


def test_a_written_file_has_the_permissions_the_umask_gives(folder):
    umask = os.umask(0o022)
    try:
        durable.write_atomically(folder / "data.h5", b"x")
    finally:
        os.umask(umask)
    assert (folder / "data.h5").stat().st_mode & 0o777 == 0o644   # readable by others, as before


def test_an_append_refuses_a_link_and_leaves_the_file_it_points_to_untouched(folder, victim):
    (folder / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(OSError) as raised:
        durable.append(folder / "metrics.jsonl", "{}\n")
    assert raised.value.errno == errno.ELOOP
    assert victim.read_bytes() == b"precious\n"


def test_an_append_adds_to_the_end_of_the_file_and_creates_a_missing_one(folder):
    durable.append(folder / "metrics.jsonl", "1\n")
    durable.append(folder / "metrics.jsonl", "2\n")
    assert (folder / "metrics.jsonl").read_text() == "1\n2\n"


def test_the_lock_file_is_never_opened_through_a_link(folder, victim):
    (folder / ".lock").symlink_to(victim)
    with pytest.raises(OSError) as raised:
        durable.open_lock_file(folder / ".lock")
    assert raised.value.errno == errno.ELOOP
    assert victim.read_bytes() == b"precious\n"
