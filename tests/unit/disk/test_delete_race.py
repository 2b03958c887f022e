"""Two deleters of unreferenced layer files race without harm: a consolidation deletes a merged
layer's files outside the disk lock, and a reset or revert (allowed between its steps) deletes
every unreferenced file. Whichever comes second finds a file gone, which is what it wanted: the
disk must stay usable. The interleavings are forced in one thread through file-system hooks."""

from __future__ import annotations

from collections.abc import Callable

from blocktrail.disk import Consolidation, Disk
from blocktrail.simfileio import SimulatedFileIO

PATH = "/sim/disk"


class HookedFileIO(SimulatedFileIO):
    """Runs ``before_unlink`` once, before the first unlink of a layer file, and
    ``after_listdir`` once, after the first listing of the disk directory, while set."""

    def __init__(self) -> None:
        super().__init__()
        self.before_unlink: Callable[[str], None] | None = None
        self.after_listdir: Callable[[list[str]], None] | None = None

    def unlink(self, path: str) -> None:
        hook, name = self.before_unlink, path.rsplit("/", 1)[-1]
        if hook is not None and name.startswith("layer-"):
            self.before_unlink = None
            hook(path)
        super().unlink(path)

    def listdir(self, path: str) -> list[str]:
        names = super().listdir(path)
        hook = self.after_listdir
        if hook is not None and path == PATH:
            self.after_listdir = None
            hook(names)
        return names


def _removal(fs: SimulatedFileIO) -> tuple[Disk, Consolidation]:
    """A disk whose snapshot s1 is being removed: s2's frozen layer merges into s1's, and its
    files are then deleted outside the disk lock."""
    disk = Disk.create(PATH, 1 << 20, 512, cluster_size=4096, fileio=fs)
    disk.pwrite(b"x" * 4096, 0)
    disk.create_snapshot("s1")
    disk.pwrite(b"y" * 4096, 8192)
    disk.create_snapshot("s2")
    return disk, disk.begin_remove_snapshot("s1")


def _usable(disk: Disk) -> None:
    disk.pwrite(b"z" * 512, 0)
    assert disk.pread(512, 0) == b"z" * 512
    assert disk.open_snapshot("s2").pread(4096, 8192) == b"y" * 4096
    disk.close()


def test_a_reset_deleting_a_merged_layer_first_leaves_the_consolidation_working() -> None:
    fs = HookedFileIO()
    disk, removal = _removal(fs)
    resets: list[str] = []
    fs.before_unlink = lambda path: resets.append(disk.reset_tracking())
    removal.run()  # its own unlink finds the file the reset deleted gone
    assert resets and removal.done
    _usable(disk)


def test_a_consolidation_deleting_a_merged_layer_first_leaves_the_reset_working() -> None:
    fs = HookedFileIO()
    disk, removal = _removal(fs)
    resets: list[str] = []

    def reset(path: str) -> None:  # the consolidation is about to delete the merged layer
        stem = path.rsplit(".", 1)[0]

        def consolidation_deletes(_names: list[str]) -> None:  # after the reset listed them
            for merged in (f"{stem}.img", f"{stem}.map"):
                SimulatedFileIO.unlink(fs, merged)

        fs.after_listdir = consolidation_deletes
        resets.append(disk.reset_tracking())

    fs.before_unlink = reset
    removal.run()
    assert resets and removal.done
    _usable(disk)
