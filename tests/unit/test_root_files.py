"""Root's files are root's: a directory weft keeps its state in is created private, or
refused (one line naming the path and why) when it is a symlink, others can write it, or
another user could swap it or a directory above it; a fast path object is used only if it
is the one weft built. (Owners other than this user are the netns tests': no chown here.)"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from weft.core.errors import PermissionProblem
from weft.host.fastpath import BuiltObjectMismatch, check_built
from weft.host.files import private_dir


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_missing_directory_is_created_private_and_one_of_ours_is_narrowed(
        tmp_path: Path) -> None:
    made = private_dir(tmp_path / "a" / "state", "state directory")
    assert mode(made) == 0o700
    assert mode(tmp_path / "a") == 0o755  # parents: readable, not writable, by others
    (tmp_path / "old").mkdir(0o755)
    os.chmod(tmp_path / "old", 0o755)
    private_dir(tmp_path / "old", "state directory")
    assert mode(tmp_path / "old") == 0o700
    # Asked for 0755 (the subnet file's directory): never widened, never narrowed below.
    assert mode(private_dir(tmp_path / "run", "subnet file directory", mode=0o755)) == 0o755
    assert mode(private_dir(made, "subnet file directory", mode=0o755)) == 0o700


def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(0o700)
    (tmp_path / "state").symlink_to(tmp_path / "real")
    with pytest.raises(PermissionProblem, match=rf"state directory {tmp_path}/state is a "
                                                "symlink; weft will not follow it"):
        private_dir(tmp_path / "state", "state directory")


def test_a_directory_others_can_write_is_refused_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    os.chmod(tmp_path / "state", 0o777)
    with pytest.raises(PermissionProblem, match=f"mode 0777: others can write it; fix it "
                                                f"with `chmod 700 {tmp_path}/state`"):
        private_dir(tmp_path / "state", "state directory")


def test_a_directory_above_that_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # anyone could rename `state` away and put their own there
    with pytest.raises(PermissionProblem, match=f"{shared} has mode 0777: others could "
                                                "replace what is in it"):
        private_dir(shared / "state", "state directory")
    assert not (shared / "state").exists()  # refused before anything was made
    os.chmod(shared, 0o1777)  # sticky, as /tmp: only the owner of `state` may rename it
    assert mode(private_dir(shared / "state", "state directory")) == 0o700


def test_a_file_where_the_directory_should_be_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    with pytest.raises(PermissionProblem, match="is not a directory"):
        private_dir(tmp_path / "state", "state directory")


def built(tmp_path: Path, content: bytes = b"\x7fELF weft's program") -> Path:
    obj = tmp_path / "fastpath.o"
    obj.write_bytes(content)
    obj.chmod(0o600)
    record = tmp_path / "fastpath.o.sha256"
    record.write_text(hashlib.sha256(content).hexdigest() + "\n")
    record.chmod(0o600)
    return obj


def test_a_fast_path_object_is_used_only_if_it_is_the_one_weft_built(tmp_path: Path) -> None:
    obj = built(tmp_path)
    check_built(obj)
    obj.write_bytes(b"\x7fELF a program that drops everything")
    with pytest.raises(BuiltObjectMismatch, match="is not the one weft built"):
        check_built(obj)
    (tmp_path / "fastpath.o.sha256").unlink()
    with pytest.raises(BuiltObjectMismatch, match="has no build record"):
        check_built(obj)


def test_a_fast_path_object_others_can_write_or_a_symlink_is_refused(tmp_path: Path) -> None:
    obj = built(tmp_path)
    obj.chmod(0o666)
    with pytest.raises(PermissionProblem, match=f"fast path object {obj} has mode 0666"):
        check_built(obj)
    obj.chmod(0o600)
    link = tmp_path / "link.o"
    link.symlink_to(obj)
    (tmp_path / "link.o.sha256").write_text((tmp_path / "fastpath.o.sha256").read_text())
    with pytest.raises(PermissionProblem, match="symlink"):
        check_built(link)


def test_without_a_packaged_object_or_clang_the_reason_says_what_to_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from weft.core.errors import KernelFeatureMissing
    from weft.host import fastpath

    monkeypatch.setattr(fastpath, "packaged_object", lambda: None)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(KernelFeatureMissing, match="no clang here to compile one: install "
                       "clang and libbpf-dev, or a weft package built with them"):
        fastpath.fastpath_object(tmp_path / "bpf")
    assert list((tmp_path / "bpf").iterdir()) == []  # nothing half-made left behind


def test_the_packaged_object_is_copied_with_weft_s_record_and_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from weft.host import fastpath

    program = b"\x7fELF the packaged program"
    monkeypatch.setattr(fastpath, "packaged_object", lambda: program)
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no compiler here
    obj, origin = fastpath.fastpath_object(tmp_path / "bpf")
    assert (obj.read_bytes(), origin) == (program, "from the package")
    assert stat.S_IMODE(obj.stat().st_mode) == 0o600
    check_built(obj)
    assert fastpath.fastpath_object(tmp_path / "bpf") == (obj, "kept")


def test_a_packaged_record_names_its_source_and_its_object() -> None:
    from weft.host.fastpath import build_record

    record = json.loads(build_record(b"int main;", b"\x7fELF"))
    assert record == {"source_sha256": hashlib.sha256(b"int main;").hexdigest(),
                      "object_sha256": hashlib.sha256(b"\x7fELF").hexdigest()}
