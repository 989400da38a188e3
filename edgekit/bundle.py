"""Bundles: the unit that moves from the converter to the fleet and onto devices.

A bundle is a directory holding the model file, ``manifest.json``, ``golden.npz`` and
``signature.json``, or a ``.ekb`` tar of that directory. Verification re-hashes every file
and checks the manifest signature, so any changed byte is detected.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from edgekit import signing
from edgekit.archive import extract_bundle
from edgekit.errors import BundleError
from edgekit.manifest import Manifest

__all__ = [
    "Bundle",
    "BundleVerification",
    "MANIFEST_FILE",
    "SIGNATURE_FILE",
    "open_bundle",
    "pack",
    "sha256_file",
    "verify_bundle",
    "write_bundle",
]

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "signature.json"
GOLDEN_FILE = "golden.npz"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, or of every file of a directory (e.g. an .mlpackage) in sorted order."""
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
            h.update(bytes.fromhex(sha256_file(f)))
        return h.hexdigest()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


@dataclass(frozen=True)
class Bundle:
    """An opened bundle directory."""

    root: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        """The model file inside the bundle."""
        return self.root / self.manifest.file

    def golden(self) -> dict[str, np.ndarray]:
        """The golden set: ``x`` inputs, ``y_float`` float-model outputs, ``y_host`` this model's outputs."""
        with np.load(self.root / self.manifest.golden.file, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}


def write_bundle(
    root: Path,
    manifest_fields: dict,
    model_file: Path,
    golden: dict[str, np.ndarray],
    *,
    signing_key: signing.Ed25519PrivateKey,
    min_top1_agreement: float,
    atol: float,
    extra_files: tuple[tuple[Path, str], ...] = (),
) -> Bundle:
    """Write a complete bundle into ``root`` (an empty or new directory) and sign it.

    ``manifest_fields`` holds everything but the file facts, which are computed here.
    """
    root.mkdir(parents=True, exist_ok=True)
    dest = root / model_file.name
    if model_file.resolve() != dest.resolve():
        (shutil.copytree if model_file.is_dir() else shutil.copy2)(model_file, dest)
    extras = []
    for src, purpose in extra_files:
        shutil.copy2(src, root / src.name)
        extras.append({"file": src.name, "sha256": sha256_file(root / src.name), "purpose": purpose})
    np.savez(root / GOLDEN_FILE, **golden)
    first = next(iter(golden.values()))
    manifest = Manifest.model_validate(
        {
            **manifest_fields,
            "file": dest.name,
            "sha256": sha256_file(dest),
            "size_bytes": _size(dest),
            "extra_files": extras,
            "golden": {
                "file": GOLDEN_FILE,
                "sha256": sha256_file(root / GOLDEN_FILE),
                "count": int(first.shape[0]),
                "min_top1_agreement": min_top1_agreement,
                "atol": atol,
            },
        }
    )
    data = (manifest.model_dump_json(indent=2) + "\n").encode()
    (root / MANIFEST_FILE).write_bytes(data)
    pub = signing.public_key_b64(signing_key)
    sig = {"algorithm": "ed25519", "public_key": pub, "key_id": signing.fingerprint(pub), "signature": signing.sign(signing_key, data)}
    (root / SIGNATURE_FILE).write_text(json.dumps(sig, indent=2) + "\n")
    return Bundle(root, manifest)


def _extract(archive: Path) -> Path:
    """Unpack an ``.ekb`` (safely, with limits) into a temporary directory removed when the process exits."""
    parent = Path(tempfile.mkdtemp(prefix="edgekit-bundle-"))
    atexit.register(shutil.rmtree, parent, ignore_errors=True)
    try:
        return extract_bundle(archive, parent / "bundle")
    except BundleError:
        shutil.rmtree(parent, ignore_errors=True)
        raise


def open_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Open a bundle directory or ``.ekb`` archive and parse its manifest (no hashing)."""
    p = Path(path)
    if not p.exists():
        raise BundleError(f"{p}: no such bundle", "Pass a bundle directory written by 'edgekit convert --out'.")
    if p.is_file():
        if p.name == MANIFEST_FILE:
            p = p.parent
        else:
            p = _extract(p)
    mpath = p / MANIFEST_FILE
    if not mpath.is_file():
        raise BundleError(f"{p}: no {MANIFEST_FILE}; not a bundle", "Pass a directory written by 'edgekit convert --out'.")
    try:
        manifest = Manifest.model_validate_json(mpath.read_bytes())
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise BundleError(f"{mpath}: invalid manifest: {loc}: {first['msg']}", "Rebuild the bundle with 'edgekit convert'.") from None
    for name in (manifest.file, *(e.file for e in manifest.extra_files)):
        if Path(name).name != name or name in (MANIFEST_FILE, SIGNATURE_FILE, GOLDEN_FILE):
            raise BundleError(f"{mpath}: file name '{name}' is not allowed in a bundle", "Rebuild the bundle.")
    if Path(manifest.golden.file).name != manifest.golden.file or manifest.golden.file in (MANIFEST_FILE, SIGNATURE_FILE, manifest.file):
        raise BundleError(f"{mpath}: golden file name '{manifest.golden.file}' is not allowed in a bundle", "Rebuild the bundle.")
    return Bundle(p, manifest)


@dataclass(frozen=True)
class BundleVerification:
    """What ``verify_bundle`` checked."""

    path: str
    ok: bool
    checks: tuple[tuple[str, bool, str], ...]
    key_id: str | None
    public_key: str | None = None
    """The signer's base64 public key when the signature verified (None otherwise)."""

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "path": self.path,
            "ok": self.ok,
            "key_id": self.key_id,
            "public_key": self.public_key,
            "checks": [{"check": c, "ok": ok, "detail": d} for c, ok, d in self.checks],
        }


def verify_bundle(path: str | os.PathLike[str], trusted_keys: tuple[str, ...] = ()) -> BundleVerification:
    """Check the signature and every hash; a changed byte anywhere fails a check.

    ``trusted_keys`` (base64 public keys): when given, the signer must be one of them.
    """
    bundle = open_bundle(path)
    root, m = bundle.root, bundle.manifest
    checks: list[tuple[str, bool, str]] = []
    key_id = public_key = None
    sig_path = root / SIGNATURE_FILE
    manifest_bytes = (root / MANIFEST_FILE).read_bytes()
    try:
        if sig_path.exists() and (sig_path.is_symlink() or not sig_path.is_file()):
            raise BundleError(f"{SIGNATURE_FILE} is not a regular file")
        sig = json.loads(sig_path.read_text())
        key_id = signing.fingerprint(sig["public_key"])
        signing.verify(sig["public_key"], manifest_bytes, sig["signature"])
        public_key = sig["public_key"]
        checks.append(("signature", True, f"ed25519 key {key_id}"))
        if trusted_keys:
            trusted = sig["public_key"] in trusted_keys
            checks.append(("trusted signer", trusted, "key is trusted" if trusted else f"key {key_id} is not in the trusted set"))
    except FileNotFoundError:
        checks.append(("signature", False, f"{SIGNATURE_FILE} is missing"))
    except (KeyError, ValueError, TypeError):
        checks.append(("signature", False, f"{SIGNATURE_FILE} is malformed"))
    except BundleError as e:
        checks.append(("signature", False, e.message))
    files = [(f"model {m.file}", m.file, m.sha256), (f"golden {m.golden.file}", m.golden.file, m.golden.sha256)]
    files += [(f"file {e.file}", e.file, e.sha256) for e in m.extra_files]
    for label, rel, expected in files:
        f = root / rel
        if not f.exists() and not f.is_symlink():
            checks.append((label, False, "missing"))
            continue
        if problem := _not_plain(root, f):
            checks.append((label, False, problem))
            continue
        actual = sha256_file(f)
        checks.append((label, actual == expected, "sha256 matches" if actual == expected else f"sha256 {actual[:12]}… != manifest {expected[:12]}…"))
    if (root / m.file).exists() and not _not_plain(root, root / m.file):
        size = _size(root / m.file)
        checks.append(("model size", size == m.size_bytes, f"{size} bytes" if size == m.size_bytes else f"{size} != manifest {m.size_bytes}"))
    return BundleVerification(str(path), all(ok for _, ok, _ in checks), tuple(checks), key_id, public_key)


def _not_plain(root: Path, f: Path) -> str | None:
    """Why ``f`` may not be hashed as part of the bundle at ``root`` (None: it may).

    Only regular files (or a directory of them, e.g. an .mlpackage) inside the bundle count:
    a link or a device file could make the bundle depend on bytes it does not contain.
    """
    inside = root.resolve()
    for p in (f, *(f.rglob("*") if f.is_dir() and not f.is_symlink() else ())):
        if p.is_symlink():
            return "a symbolic link, not a file inside the bundle"
        if not (p.is_file() or p.is_dir()):
            return "not a regular file"
        if not p.resolve().is_relative_to(inside):
            return "outside the bundle"
    return None


def pack(bundle_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Write a ``.ekb`` (gzip tar) of a bundle directory, atomically: only the files its manifest lists, never a link."""
    from edgekit.archive import refuse_links

    bundle = open_bundle(bundle_dir)
    refuse_links(bundle.root)
    m = bundle.manifest
    target = Path(out) if out else bundle.root.with_suffix(".ekb")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    names = sorted({MANIFEST_FILE, SIGNATURE_FILE, m.golden.file, m.file, *(e.file for e in m.extra_files)})
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(bundle.root, arcname=bundle.root.name, recursive=False)
            for name in names:
                if (bundle.root / name).exists():
                    tar.add(bundle.root / name, arcname=f"{bundle.root.name}/{name}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
