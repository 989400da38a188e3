"""Content-addressed model slots and the atomic switch of the active-model pointer.

A slot is ``models/<sha256>/`` holding ``bundle/`` (the extracted bundle), ``artifact.ekb`` (the bytes
the server sent, so the slot's sha256 can be re-checked at any time) and ``slot.json`` (what it is).
A slot appears by renaming a complete temporary directory, so it exists whole or not at all. The
active model is named by ``active.json`` (format owned by :mod:`edgekit.runtime`, which apps read
through ``load_active``), replaced by an atomic rename: the device always has the old pointer or the
new one. The previous slot is kept for a revert; older ones are garbage-collected (keep N).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from edgekit.archive import copy_bundle_dir, extract_bundle
from edgekit.bundle import sha256_file, verify_bundle
from edgekit.errors import BundleError, VerificationError
from edgekit.runtime import ACTIVE_POINTER, ActivePointer, read_active_pointer

from device_agents.store import DataDir, atomic_write_json, fsync_dir, fsync_tree, read_json, utc_now

__all__ = ["Slots"]


def _extract_into(archive: Path, dest: Path) -> None:
    """Extract a ``.ekb`` so that ``dest`` is the bundle directory (only listed members, bounded, no links)."""
    try:
        extract_bundle(archive, dest)
    except BundleError as e:
        raise VerificationError(e.message, reason="bundle_invalid") from None


class Slots:
    """The models directory of one data dir."""

    def __init__(self, data: DataDir, keep: int = 3) -> None:
        self.data = data
        self.keep = max(2, keep)  # the active slot and the previous one are never collected

    def path(self, sha: str) -> Path:
        return self.data.models / sha

    def part_path(self, sha: str) -> Path:
        """Where a download of ``sha`` accumulates (resumed with Range after a restart)."""
        return self.data.models / f"{sha}.part"

    def bundle(self, sha: str) -> Path:
        return self.path(sha) / "bundle"

    def has(self, sha: str) -> bool:
        return (self.path(sha) / "slot.json").is_file()

    def info(self, sha: str) -> dict | None:
        return read_json(self.path(sha) / "slot.json")

    def _tmp(self, sha: str) -> Path:
        tmp = self.data.models / f".{sha}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a crash: start over
        shutil.rmtree(tmp.with_name(tmp.name + ".x"), ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def _commit(self, sha: str, tmp: Path, facts: dict) -> Path:
        """Make the slot durable, then rename it into place and make the rename durable.

        Only after this returns may ``active.json`` name the slot (``point_to``): a power cut must not
        leave a pointer to a slot that is missing or whose files are empty.
        """
        atomic_write_json(tmp / "slot.json", {**facts, "sha256": sha, "installed_at": utc_now(), "blocked": None})
        fsync_tree(tmp)  # every extracted or copied file and each directory of the slot
        target = self.path(sha)
        if target.exists():  # a stale, incomplete slot cannot exist (slots appear by rename), but a blocked one can
            shutil.rmtree(target)
        os.replace(tmp, target)
        fsync_dir(self.data.models)  # the slot's name in models/
        return target

    def create_from_artifact(self, sha: str, archive: Path, facts: dict, check: Callable[[Path], dict]) -> Path:
        """Make slot ``sha`` from a ``.ekb`` whose sha256 was checked (kept in the slot as ``artifact.ekb``).

        ``check(bundle_dir)`` runs on the extracted bundle before the slot exists and returns facts for slot.json.
        """
        tmp = self._tmp(sha)
        try:
            _extract_into(archive, tmp / "bundle")
            facts = {**facts, **check(tmp / "bundle")}
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a refused bundle leaves no temporary slot behind
            raise
        try:  # a link, not a move: killed before the commit, the step starts over from the intact download
            os.link(archive, tmp / "artifact.ekb")
        except OSError:
            shutil.copy2(archive, tmp / "artifact.ekb")
        target = self._commit(sha, tmp, facts)
        archive.unlink(missing_ok=True)
        return target

    def create_from_source(self, sha: str, source: Path, facts: dict, check: Callable[[Path], dict]) -> Path:
        """Make slot ``sha`` from a local bundle directory or ``.ekb`` (copied; the source is untouched)."""
        tmp = self._tmp(sha)
        try:
            if source.is_dir():
                try:
                    copy_bundle_dir(source, tmp / "bundle")
                except BundleError as e:
                    raise VerificationError(e.message, reason="bundle_invalid") from None
            else:
                shutil.copy2(source, tmp / "artifact.ekb")
                _extract_into(tmp / "artifact.ekb", tmp / "bundle")
            facts = {**facts, **check(tmp / "bundle")}
            return self._commit(sha, tmp, facts)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a refused install leaves no temporary slot behind
            raise

    def verify(self, sha: str) -> None:
        """Re-check a slot: the artifact's sha256 (or the directory hash) and every bundle hash; raises on a mismatch."""
        if not self.has(sha):
            raise VerificationError(f"slot {sha[:12]} does not exist", reason="activation_failed")
        artifact = self.path(sha) / "artifact.ekb"
        actual = sha256_file(artifact if artifact.exists() else self.bundle(sha))
        if actual != sha:
            raise VerificationError(f"slot {sha[:12]}: sha256 is now {actual[:12]}; the stored model changed", reason="sha256_mismatch")
        try:
            result = verify_bundle(self.bundle(sha))
        except BundleError as e:
            raise VerificationError(f"slot {sha[:12]}: {e.message}", reason="bundle_invalid") from None
        if not result.ok:
            failed = ", ".join(c for c, ok, _ in result.checks if not ok)
            raise VerificationError(f"slot {sha[:12]}: bundle checks failed ({failed})", reason="bundle_invalid")

    def active(self) -> ActivePointer | None:
        return read_active_pointer(self.data.root)

    def active_sha(self) -> str | None:
        ptr = self.active()
        return ptr.sha256 if ptr else None

    def point_to(self, sha: str | None, *, previous: str | None) -> None:
        """Switch the active model (None: no model active) with one atomic rename of the pointer."""
        if sha is None:
            atomic_write_json(self.data.root / ACTIVE_POINTER, {"sha256": None, "previous": previous, "activated_at": utc_now()})
            return
        info = self.info(sha) or {}
        atomic_write_json(self.data.root / ACTIVE_POINTER, {
            "sha256": sha, "name": info.get("name", ""), "version": info.get("version", ""),
            "bundle": f"models/{sha}/bundle", "previous": previous, "activated_at": utc_now(),
        })

    def previous_sha(self) -> str | None:
        """The slot that was active before the current one (what a revert returns to)."""
        data = read_json(self.data.root / ACTIVE_POINTER) or {}
        return data.get("previous")

    def block(self, sha: str, reason: str) -> None:
        """Keep a slot out of use (it failed its gate or was rolled back); it is collected first."""
        info = self.info(sha)
        if info is not None:
            atomic_write_json(self.path(sha) / "slot.json", {**info, "blocked": reason})

    def list(self) -> list[dict]:
        """Every complete slot's facts."""
        out = []
        for p in self.data.models.iterdir():
            if p.is_dir() and not p.name.startswith(".") and (p / "slot.json").is_file():
                info = read_json(p / "slot.json") or {}
                out.append({**info, "sha256": p.name})
        return out

    def gc(self, *, protect: tuple[str | None, ...] = ()) -> list[str]:
        """Remove slots beyond ``keep`` (blocked ones first, then the oldest), never the active or previous one."""
        keep_set = {self.active_sha(), self.previous_sha(), *protect} - {None}
        slots = [s for s in self.list() if s["sha256"] not in keep_set]
        slots.sort(key=lambda s: (s.get("blocked") is None, s.get("installed_at", "")))  # blocked first, then oldest
        removed = []
        while slots and len(slots) + len(keep_set) > self.keep:
            victim = slots.pop(0)["sha256"]
            shutil.rmtree(self.path(victim), ignore_errors=True)
            removed.append(victim)
        for p in self.data.models.iterdir():  # leftovers of interrupted work that no job refers to
            if p.name.startswith(".") and p.name.endswith((".tmp", ".tmp.x")):
                shutil.rmtree(p, ignore_errors=True)
        return removed
