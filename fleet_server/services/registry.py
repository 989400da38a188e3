"""The model registry: validated uploads become immutable versions; artifacts stored once by sha256."""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edgekit.protocol import MODEL_NAME_PATTERN, VERSION_PATTERN
from fleet_server.context import AppContext
from fleet_server.db import utc, utcnow
from fleet_server.errors import BadRequest, Conflict, InvalidRequest, NotFound
from fleet_server.replicas import serialised_upload
from fleet_server.services.publishers import allowed_keys
from fleet_server.services.validation import ValidatedBundle, validate_ekb
from fleet_server.tables import Artifact, Model, ModelVersion, VersionArtifact

__all__ = ["NAME_RE", "VERSION_RE", "check_name", "check_version", "check_upload", "get_version", "list_models", "new_staging_dir",
           "store_version", "sweep_orphan_artifacts", "upload_version", "version_row"]

log = logging.getLogger("edgekit.fleet")

NAME_RE = re.compile(MODEL_NAME_PATTERN)
VERSION_RE = re.compile(VERSION_PATTERN)


def check_name(name: str) -> str:
    """A valid model name, or 422."""
    if not NAME_RE.fullmatch(name):
        raise InvalidRequest(f"invalid model name {name!r}", "Model names match ^[a-z0-9][a-z0-9._-]{0,63}$.")
    return name


def check_version(version: str) -> str:
    """A valid version string, or 422."""
    if not VERSION_RE.fullmatch(version):
        raise InvalidRequest(f"invalid version {version!r}", "Versions match ^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$.")
    return version


def version_row(session: Session, name: str, version: str) -> ModelVersion | None:
    """The version row of ``name`` ``version``, if it exists."""
    return session.execute(
        select(ModelVersion).join(Model, Model.id == ModelVersion.model_id).where(Model.name == name, ModelVersion.version == version)
    ).scalar_one_or_none()


def artifact_public(va: VersionArtifact, size: int) -> dict[str, Any]:
    """An artifact as the API shows it."""
    return {"sha256": va.artifact_sha256, "size_bytes": size, "profile": va.profile, "format": va.format, "file": va.file,
            "manifest_sha256": va.manifest_sha256, "manifest": va.manifest, "validation": va.validation}


def _version_public(session: Session, name: str, mv: ModelVersion) -> dict[str, Any]:
    rows = session.execute(
        select(VersionArtifact, Artifact.size_bytes).join(Artifact, Artifact.sha256 == VersionArtifact.artifact_sha256)
        .where(VersionArtifact.version_id == mv.id).order_by(VersionArtifact.profile, VersionArtifact.format)
    ).all()
    return {"name": name, "version": mv.version, "created_at": utc(mv.created_at),
            "artifacts": [artifact_public(va, size) for va, size in rows]}


def get_version(session: Session, name: str, version: str) -> dict[str, Any]:
    """A version with its artifacts, or NotFound."""
    mv = version_row(session, name, version)
    if mv is None:
        raise NotFound(f"no version '{version}' of model '{name}'", "List versions with GET /v1/models.")
    return _version_public(session, name, mv)


def list_models(session: Session) -> list[dict[str, Any]]:
    """Every model with its versions, oldest first, and the latest."""
    rows = session.execute(
        select(Model.name, ModelVersion.version).join(ModelVersion, ModelVersion.model_id == Model.id)
        .order_by(Model.name, ModelVersion.created_at, ModelVersion.id)
    ).all()
    out: dict[str, list[str]] = {}
    for name, version in rows:
        out.setdefault(name, []).append(version)
    return [{"name": n, "versions": v, "latest": v[-1]} for n, v in out.items()]


def new_staging_dir(ctx: AppContext) -> Path:
    """A private directory for one upload, removed by the caller (and at the next start)."""
    root = ctx.settings.data_dir / "staging"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="upload-", dir=root))


def upload_version(ctx: AppContext, name: str, version: str | None, bundles: list[tuple[str, Path]], work: Path) -> dict[str, Any]:
    """Validate every bundle, then store the artifacts and the version in one transaction.

    Nothing is written to the registry or the artifact directory unless every check passed; a
    database failure after the artifact writes removes the artifacts this call created (unless a
    committed version references them).
    """
    version, checked = check_upload(ctx, name, version, bundles, work)
    return store_version(ctx, name, version, checked)


def check_upload(ctx: AppContext, name: str, version: str | None, bundles: list[tuple[str, Path]],
                 work: Path) -> tuple[str, list[ValidatedBundle]]:
    """Every check of an upload (reads only): the version to store and the validated bundles; BadRequest/Conflict otherwise."""
    check_name(name)
    if version is not None:
        check_version(version)
        with ctx.db.read() as s:
            if version_row(s, name, version) is not None:
                raise Conflict(f"model '{name}' version '{version}' exists; versions are immutable", "Upload under a new version.")
    if not bundles:
        raise InvalidRequest("no bundles in the upload", "Send one or more .ekb files as multipart parts named 'bundles'.")
    with ctx.db.read() as s:
        publishers = allowed_keys(s)  # only bundles signed by an allowed publisher key are stored (docs/security.md)
    checked: list[ValidatedBundle] = []
    for i, (label, path) in enumerate(bundles):
        checked.append(validate_ekb(path, label, work / f"x{i}", max_extract_bytes=4 * ctx.settings.max_upload_bytes,
                                    publishers=publishers))
        shutil.rmtree(work / f"x{i}", ignore_errors=True)
    for v in checked:
        if v.name != name:
            raise BadRequest(f"{v.ekb.name}: the bundle is model '{v.name}', not '{name}'", f"Upload it to /v1/models/{v.name}/versions.",
                             code="bad_bundle")
    if version is not None:
        # Version truth (docs/server.md): the registry version is the manifests' version, or the upload is refused.
        # Re-stamping would change a publisher-signed manifest; a device reports the registry version of its assignment.
        wrong = sorted({f"{label} says {v.version}" for (label, _), v in zip(bundles, checked) if v.version != version})
        if wrong:
            raise BadRequest(f"the registry version '{version}' differs from the bundles' manifest version ({'; '.join(wrong)})",
                             "Convert (or re-sign) the bundle with that version, or leave 'version' out to use the manifest's.",
                             code="version_mismatch")
    if version is None:
        versions = sorted({v.version for v in checked})
        if len(versions) > 1:
            raise BadRequest(f"the bundles are of different versions ({', '.join(versions)})", "Upload one version at a time, or pass 'version'.",
                             code="bad_bundle")
        version = check_version(versions[0])
    seen: dict[tuple[str, str], str] = {}
    for label, v in zip((b[0] for b in bundles), checked):
        key = (v.profile, v.format)
        if key in seen:
            raise BadRequest(f"two bundles for profile '{v.profile}' format '{v.format}' ({seen[key]}, {label})",
                             "Upload at most one bundle per (profile, format).", code="bad_bundle")
        seen[key] = label
    return version, checked


def store_version(ctx: AppContext, name: str, version: str, checked: list[ValidatedBundle]) -> dict[str, Any]:
    """Store validated bundles as ``name`` ``version``: the artifact files, then the rows, in one transaction.

    The files are content-addressed and shared between versions, so the whole store (file writes,
    transaction, and the undo of a failed one) runs under the server's upload lock: a failed upload
    deletes a file it created only when no committed row references it, and no other upload can be
    between its own file write and its commit at that moment (else its file could vanish under it).
    """
    with serialised_upload(ctx):  # every replica's uploads, through the database (fleet_server.replicas)
        return _store(ctx, name, version, checked)


def _store(ctx: AppContext, name: str, version: str, checked: list[ValidatedBundle]) -> dict[str, Any]:
    created: list[str] = []
    try:
        for v in checked:
            if ctx.store.put(v.ekb, v.sha256):
                created.append(v.sha256)
        with ctx.db.write() as s:
            now = utcnow()
            if version_row(s, name, version) is not None:
                raise Conflict(f"model '{name}' version '{version}' exists; versions are immutable", "Upload under a new version.")
            model = s.execute(select(Model).where(Model.name == name)).scalar_one_or_none()
            if model is None:
                model = Model(name=name, created_at=now)
                s.add(model)
                s.flush()
            mv = ModelVersion(model_id=model.id, version=version, created_at=now)
            s.add(mv)
            s.flush()
            for v in checked:
                if s.get(Artifact, v.sha256) is None:
                    s.add(Artifact(sha256=v.sha256, size_bytes=v.size_bytes, created_at=now))
                    s.flush()
                s.add(VersionArtifact(version_id=mv.id, artifact_sha256=v.sha256, profile=v.profile, format=v.format, file=v.file,
                                      manifest=v.manifest, manifest_sha256=v.manifest_sha256, validation=v.validation))
            s.flush()
            result = _version_public(s, name, mv)
        return result
    except IntegrityError:
        _undo(ctx, created)
        raise Conflict(f"model '{name}' version '{version}' exists; versions are immutable", "Upload under a new version.") from None
    except BaseException:
        _undo(ctx, created)
        raise


def _undo(ctx: AppContext, created: list[str]) -> None:
    """Remove the files a failed store created and no committed row references (called under the upload lock)."""
    if not created:
        return
    try:
        with ctx.db.read() as s:
            referenced = set(s.execute(select(Artifact.sha256).where(Artifact.sha256.in_(created))).scalars())
    except Exception:  # noqa: BLE001 - the database is unreachable: keep the files (the start-up sweep removes orphans)
        log.exception("could not check which artifact files a failed upload may remove; keeping them")
        return
    for sha in created:
        if sha not in referenced:
            ctx.store.delete(sha)


def sweep_orphan_artifacts(ctx: AppContext) -> int:
    """At start-up: remove artifact files that no database row references (left by a crash between a
    file write and its transaction's commit). Returns how many were removed.

    A database that references no artifact at all removes nothing (that is more likely the wrong
    database for this data dir than a registry whose every upload crashed): it is logged instead.
    """
    files = ctx.store.list()
    if not files:
        return 0
    with ctx.db.read() as s:
        referenced = set(s.execute(select(Artifact.sha256)).scalars())
    orphans = sorted(set(files) - referenced)
    if not orphans:
        return 0
    if not referenced:
        log.warning("%d artifact files in %s but the database references none; not removing them (is --db the right database?)",
                    len(orphans), ctx.settings.artifacts_dir)
        return 0
    for sha in orphans:
        log.warning("removing orphan artifact %s (no version references it; left by an interrupted upload)", sha)
        ctx.store.delete(sha)
    return len(orphans)
