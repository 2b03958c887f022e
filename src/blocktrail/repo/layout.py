"""Where each kind of object lives in a repository: the one place object names are made and
parsed (docs/repository.md, "Objects"). Every name here is a valid backend name."""

from __future__ import annotations

import re

from blake3 import blake3

CONFIG = "config.json"
PACKS = "packs/"
INDEX = "index/"
POINTS = "points/"
QUARANTINE = "quarantine/"
VERIFY = "verify/"
LEASES = "leases/"
GC = "gc/"
PROBE = "probe/"
MAINTENANCE_LEASE = "leases/maintenance.json"
KEYS_LEASE = "leases/keys.json"  # held while key files are added, removed or replaced
KEYS = "keys/"

_PACK = re.compile(r"packs/([0-9a-f]{2})/([0-9a-f]{32})\.pack")
_PACK_ID = re.compile(r"[0-9a-f]{32}")
_LEASE = re.compile(r"leases/[0-9A-Za-z][0-9A-Za-z_-]*\.json")
_INDEX = re.compile(r"index/([0-9A-Za-z_-]+\.idx)")
_POINT = re.compile(r"points/([0-9A-Za-z][0-9A-Za-z._-]*)\.json")
_VERIFY = re.compile(r"verify/([0-9A-Za-z][0-9A-Za-z._-]*)/([0-9]{8}T[0-9]{9}Z-[0-9a-f]{8})"
                     r"\.json")
_KEY = re.compile(r"keys/([0-9a-f]{16})\.json")
_RUN = re.compile(r"gc/([0-9]{8}T[0-9]{9}Z-[0-9a-f]{8})\.(condemned|writers)\.json")


def is_pack_id(value: object) -> bool:
    """``value`` is a pack ID: 32 lowercase hex digits."""
    return isinstance(value, str) and _PACK_ID.fullmatch(value) is not None


def pack(pack_id: str) -> str:
    return f"packs/{pack_id[:2]}/{pack_id}.pack"


def pack_id_of(name: str) -> str | None:
    """The pack ID of ``packs/<first two hex digits>/<pack id>.pack``; None for any other
    name, a pack file in another folder too (reads look for a pack where `pack` puts it)."""
    match = _PACK.fullmatch(name)
    return match[2] if match and match[1] == match[2][:2] else None


def misplaced_pack_id_of(name: str) -> str | None:
    """The pack ID of a pack file in another folder than its own (moved by hand): not a
    pack until it is moved back."""
    match = _PACK.fullmatch(name)
    return match[2] if match and match[1] != match[2][:2] else None


def index_file(filename: str) -> str:
    return f"index/{filename}"


def index_filename_of(name: str) -> str | None:
    match = _INDEX.fullmatch(name)
    return match[1] if match else None


def manifest(point_id: str) -> str:
    return f"points/{point_id}.json"


def point_id_of(name: str) -> str | None:
    match = _POINT.fullmatch(name)
    return match[1] if match else None


def quarantine_record(filename: str) -> str:
    return f"quarantine/{filename}"


def verify_record(point_id: str, stamp: str) -> str:
    """``stamp``: ``<UTC time to the millisecond>Z-<8 hex>``; the newest name wins."""
    return f"verify/{point_id}/{stamp}.json"


def verify_record_of(name: str) -> tuple[str, str] | None:
    """-> (point id, stamp)."""
    match = _VERIFY.fullmatch(name)
    return (match[1], match[2]) if match else None


def disk_lease(disk_id: str) -> str:
    """A disk ID may be anything (an NBD URI): its lease is named by a hash of it (in an
    encrypted repository, ``disk_id`` is already a keyed hash of the disk ID)."""
    return f"leases/disk-{blake3(disk_id.encode()).hexdigest()[:32]}.json"


def key_file(key_id: str) -> str:
    return f"keys/{key_id}.json"


def key_id_of(name: str) -> str | None:
    match = _KEY.fullmatch(name)
    return match[1] if match else None


def is_lease_name(value: object) -> bool:
    """``value`` names a lease (``leases/<name>.json``)."""
    return isinstance(value, str) and _LEASE.fullmatch(value) is not None


def writer_lease(session: str) -> str:
    return f"leases/writer-{session}.json"


def is_writer_lease(name: str) -> bool:
    """A lease of a writer of no disk (`writer_lease`): a name of its own, never taken over."""
    return name.startswith("leases/writer-")


def gc_condemned(run: str) -> str:
    return f"gc/{run}.condemned.json"


def gc_writers(run: str) -> str:
    return f"gc/{run}.writers.json"


def gc_run_of(name: str) -> tuple[str, str] | None:
    """-> (run, "condemned" | "writers")."""
    match = _RUN.fullmatch(name)
    return (match[1], match[2]) if match else None


def probe(token: str) -> str:
    return f"probe/{token}"
