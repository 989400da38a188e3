"""Upload validation of one ``.ekb``: safe extraction, manifest schema, every sha256 and the
signature, the model loading in its runtime, and the golden set reproduced on this server.

Everything happens in a private work directory; nothing here touches the registry.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.archive import ExtractLimits, extract_bundle
from edgekit.bundle import MANIFEST_FILE, Bundle, open_bundle, sha256_file, verify_bundle
from edgekit.errors import BundleError, BundleTooLargeError, EdgekitError
from edgekit.profiles import list_profiles
from fleet_server.errors import BadRequest

__all__ = ["ValidatedBundle", "validate_ekb"]

MAX_MEMBERS = 256


@dataclass(frozen=True)
class ValidatedBundle:
    """A bundle that passed every check, ready to be stored."""

    ekb: Path
    sha256: str
    size_bytes: int
    manifest: dict[str, Any]
    manifest_sha256: str
    name: str
    version: str
    profile: str
    format: str
    file: str
    validation: dict[str, Any] = field(default_factory=dict)


def _bad(label: str, message: str, hint: str = "Rebuild the bundle with 'edgekit convert' and pack it with 'edgekit bundle pack'.", code: str = "bad_bundle") -> BadRequest:
    return BadRequest(f"{label}: {message}", hint, code=code)


def _extract(ekb: Path, dest: Path, label: str, max_bytes: int) -> Path:
    """Extract with the one safe routine (:mod:`edgekit.archive`): listed members only, no links, bounded."""
    try:
        return extract_bundle(ekb, dest / "bundle", ExtractLimits(max_bytes=max_bytes, max_members=MAX_MEMBERS))
    except BundleTooLargeError as e:
        raise _bad(label, e.message, code="too_large_bundle") from None
    except BundleError as e:
        raise _bad(label, e.message) from None


def _coreml_structure(path: Path) -> str:
    try:
        import coremltools as ct  # noqa: F401 - optional, heavy
    except Exception:  # noqa: BLE001 - any import failure means: not available here
        return "structure not checked (coremltools is not installed on the server)"
    try:
        ct.models.MLModel(str(path), skip_model_load=True)
    except Exception as e:  # noqa: BLE001 - coremltools raises many types for a bad package
        raise BadRequest(f"{path.name}: coremltools cannot read this Core ML model ({e})", "Rebuild the bundle.", code="model_load_failed") from None
    return "structure checked with coremltools (Core ML cannot run on this server)"


def _load_and_check(bundle: Bundle, label: str) -> dict[str, Any]:
    from edgekit.golden import check_golden
    from edgekit.runtime import load_model_file

    m = bundle.manifest
    if m.format == "coreml":
        structure = _coreml_structure(bundle.model_path)
        note = "not measurable: Core ML cannot run on this server"
        try:
            golden = bundle.golden()
        except Exception as e:  # noqa: BLE001 - np.load on a hostile file
            raise _bad(label, f"golden set unreadable ({e})") from None
        if "x" not in golden:
            raise _bad(label, "golden set has no inputs 'x'")
        return {"loads": None, "structure": structure, "golden": {"measurable": False, "passed": None, "note": note}}
    try:
        model = load_model_file(bundle.model_path, m.format, num_threads=1)
    except EdgekitError as e:
        raise BadRequest(f"{label}: the model does not load: {e.message}", "Rebuild the bundle with 'edgekit convert'.", code="model_load_failed") from None
    except Exception as e:  # noqa: BLE001 - runtimes raise anything on a hostile file
        raise BadRequest(f"{label}: the model does not load ({type(e).__name__}: {e})", "Rebuild the bundle.", code="model_load_failed") from None
    model.manifest = m
    try:
        check = check_golden(model, bundle)
    except EdgekitError as e:
        raise BadRequest(f"{label}: the golden set does not run: {e.message}", "Rebuild the bundle.", code="golden_mismatch") from None
    except Exception as e:  # noqa: BLE001
        raise BadRequest(f"{label}: the golden set does not run ({type(e).__name__}: {e})", "Rebuild the bundle.", code="golden_mismatch") from None
    result = check.to_dict()
    if not check.measurable:
        raise BadRequest(f"{label}: golden.npz has no reference outputs (y_host) to check the model against",
                         "Rebuild the bundle with 'edgekit convert'.", code="golden_mismatch")
    if not check.passed:
        raise BadRequest(
            f"{label}: the golden set does not reproduce on the server: top-1 agreement {check.top1_agreement:.3f} "
            f"(needs {check.min_top1_agreement}), max abs error {check.max_abs_err:.4g} (atol {check.atol})",
            "The model file and the stored outputs disagree; rebuild the bundle.", code="golden_mismatch")
    return {"loads": True, "runtime": model.runtime, "golden": result}


def validate_ekb(ekb: Path, label: str, work: Path, *, max_extract_bytes: int,
                 publishers: frozenset[str] | None = None) -> ValidatedBundle:
    """Run every upload check on one ``.ekb``; raise BadRequest naming the first that fails.

    ``publishers``: the allow-list (base64 public keys); a bundle signed by any other key is refused
    (400 ``untrusted_publisher``) before its model is loaded. None: not checked.
    """
    sha = sha256_file(ekb)
    size = ekb.stat().st_size
    work.mkdir(parents=True, exist_ok=True)
    root = _extract(ekb, work, label, max_extract_bytes)
    try:
        return _check_extracted(ekb, sha, size, root, work, label, publishers)
    except OSError as e:  # e.g. a directory where the bundle has a file: the bundle is wrong, not the server
        raise _bad(label, f"a bundle file is unreadable ({e.strerror or type(e).__name__})") from None


def _check_extracted(ekb: Path, sha: str, size: int, root: Path, work: Path, label: str,
                     publishers: frozenset[str] | None = None) -> ValidatedBundle:
    try:
        bundle = open_bundle(root)
    except EdgekitError as e:
        raise _bad(label, e.message.replace(str(work), "<bundle>")) from None
    try:
        verification = verify_bundle(root)
    except EdgekitError as e:  # e.g. BundleError for a file that is not a regular file
        raise _bad(label, e.message.replace(str(work), "<bundle>")) from None
    failed = [f"{c}: {d}" for c, ok, d in verification.checks if not ok]
    if failed:
        raise _bad(label, "verification failed: " + "; ".join(failed))
    if publishers is not None and verification.public_key not in publishers:
        raise BadRequest(f"{label}: signed by publisher key {verification.key_id}, which is not on this server's publisher allow-list",
                         "Sign bundles with an allowed key, or allow this one: 'edgekit server publisher add KEY' (GET /v1/publishers lists them).",
                         code="untrusted_publisher")
    m = bundle.manifest
    if m.profile not in list_profiles():
        raise BadRequest(f"{label}: unknown hardware profile '{m.profile}'", "Build bundles for profiles this server knows (EDGEKIT_PROFILE_PATH).",
                         code="unknown_profile")
    validation = _load_and_check(bundle, label)
    validation["signature_key_id"] = verification.key_id
    manifest_bytes = (root / MANIFEST_FILE).read_bytes()
    return ValidatedBundle(
        ekb=ekb, sha256=sha, size_bytes=size, manifest=m.model_dump(mode="json"),
        manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(), name=m.name, version=m.version,
        profile=m.profile, format=m.format, file=m.file, validation=validation,
    )
