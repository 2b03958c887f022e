"""A guest and a backup app working on one disk until SIGKILL ends them (run by test_sigkill).

Prints one line per event, in the order the events reached the disk:
  READY <change-id>          the disk exists; tracking starts here
  W <id> <offset> <length>   write <id> is about to be issued (sector-aligned; every sector it
                             writes holds the 8-byte tag of <id>)
  A <id>                     write <id> returned
  F <id>                     a flush returned; every write up to <id> is durable
  S <name> <change-id>       snapshot taken (it flushed: every write so far is durable)
  C <name>                   removal (consolidation) of snapshot <name> began
  D <name>                   that removal finished
"""

from __future__ import annotations

import random
import sys
import threading
import time
from pathlib import Path

from blocktrail.disk import Disk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from faulty import TRACKERS

SIZE = 4 << 20
GRANULARITY = 4096
CLUSTER = 16384
SECTOR = 512


def tag(write_id: int) -> bytes:
    return write_id.to_bytes(8, "little")


class Worker:
    def __init__(self, disk: Disk, seed: int) -> None:
        self.disk = disk
        self.rng = random.Random(seed)
        self.lock = threading.Lock()  # orders disk mutations with their log lines
        self.next_id = 1
        self.stop = threading.Event()

    def say(self, line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def guest(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            sectors = rng.choice((1, 8, 8, 32, 128))
            offset = rng.randrange(0, SIZE // SECTOR - sectors) * SECTOR
            with self.lock:
                write_id = self.next_id
                self.next_id += 1
                self.say(f"W {write_id} {offset} {sectors * SECTOR}")
                self.disk.pwrite(tag(write_id) * (sectors * SECTOR // 8), offset)
                self.say(f"A {write_id}")
                if rng.random() < 0.2:
                    self.disk.flush()
                    self.say(f"F {write_id}")
            time.sleep(rng.random() * 0.002)

    def backup_app(self) -> None:
        previous = None
        round_no = 0
        while True:
            round_no += 1
            with self.lock:
                snap = self.disk.create_snapshot(f"r{round_no}")
                self.say(f"S {snap.name} {snap.change_id}")
            time.sleep(self.rng.random() * 0.05)
            if previous is not None:
                self.say(f"C {previous}")
                consolidation = self.disk.begin_remove_snapshot(previous)
                while not consolidation.step(max_clusters=4):
                    time.sleep(0.001)
                self.say(f"D {previous}")
            previous = snap.name


def main() -> None:
    path, seed, tracker = sys.argv[1], int(sys.argv[2]), TRACKERS[sys.argv[3]]
    # fine write-intent regions: recovery over-reports whole regions, and coarse ones would cover
    # up the marks a faulty tracker dropped
    disk = Disk.create(path, SIZE, GRANULARITY, cluster_size=CLUSTER, tracker_class=tracker,
                       intent_region_bytes=GRANULARITY)
    worker = Worker(disk, seed)
    worker.say(f"READY {disk.current_change_id}")
    threading.Thread(target=worker.guest, args=(seed + 1,), daemon=True).start()
    worker.backup_app()


if __name__ == "__main__":
    main()
