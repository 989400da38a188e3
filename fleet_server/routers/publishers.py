"""The trust chain over HTTP: the publisher allow-list (admin), what a device needs to trust
(``/v1/device/trust``), and the server key's rotations."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict, Field

from fleet_server.deps import AdminDep, AnyPrincipalDep, CtxDep
from fleet_server.services import keys, publishers

router = APIRouter(tags=["trust"])

KeyId = Annotated[str, Path(pattern=r"^[0-9a-f]{16}$", description="sha256 of the raw public key, 16 hex characters.")]


class PublisherCreate(BaseModel):
    """A publisher key to allow."""

    model_config = ConfigDict(extra="forbid")

    public_key: str = Field(min_length=44, max_length=44, pattern=r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$",
                            description="Base64 of the 32-byte Ed25519 public key ('edgekit bundle key' prints it).")
    label: str = Field(default="", max_length=200, description="Who holds the key, e.g. 'ci-main'.")


class PublisherPublic(BaseModel):
    """An allowed publisher key."""

    key_id: str
    public_key: str
    label: str
    added_at: dt.datetime


class SignedDocument(BaseModel):
    """A payload (canonical JSON) signed by a server key."""

    payload: str
    signature: str
    key_id: str


class ServerKeyPublic(BaseModel):
    """The key that signs assignments and allow-lists now."""

    public_key: str
    key_id: str


class DeviceTrust(BaseModel):
    """Everything a device needs to decide whom to trust: the rotations from any earlier server key, and the signed allow-list."""

    server_key: ServerKeyPublic
    rotations: list[SignedDocument]
    publishers: SignedDocument


class RotationResult(BaseModel):
    """A finished server key rotation."""

    sequence: int
    old_key_id: str
    new_key_id: str
    new_public_key: str
    resigned_assignments: int


@router.get("/v1/publishers", response_model=list[PublisherPublic])
def list_publishers(ctx: CtxDep, _: AdminDep) -> list[dict]:
    """The publisher allow-list: only bundles signed by one of these keys are stored and run."""
    with ctx.db.read() as s:
        return publishers.list_publishers(s)


@router.post("/v1/publishers", status_code=201, response_model=PublisherPublic)
def add_publisher(body: PublisherCreate, ctx: CtxDep, _: AdminDep) -> dict:
    """Allow a publisher key (409 when it is allowed already)."""
    with ctx.db.write() as s:
        return publishers.add_publisher(s, body.public_key, body.label)


@router.delete("/v1/publishers/{key_id}", response_model=PublisherPublic)
def remove_publisher(key_id: KeyId, ctx: CtxDep, _: AdminDep) -> dict:
    """Take a key off the allow-list: uploads it signed are refused from now on, and devices refuse its bundles."""
    with ctx.db.write() as s:
        return publishers.remove_publisher(s, key_id)


@router.get("/v1/device/trust", response_model=DeviceTrust)
def device_trust(ctx: CtxDep, _: AnyPrincipalDep) -> dict:
    """The server key, its rotations (each signed by the key before it) and the allow-list signed by the current key."""
    with ctx.db.read() as s:
        return {"server_key": {"public_key": ctx.key.public_key, "key_id": ctx.key.key_id}, "rotations": keys.rotation_chain(s),
                "publishers": publishers.signed_allow_list(ctx, s)}


@router.get("/v1/server/key-rotations", response_model=list[SignedDocument])
def key_rotations(ctx: CtxDep) -> list[dict]:
    """Every rotation of the server key, oldest first (public: each is signed by the key it replaces)."""
    with ctx.db.read() as s:
        return keys.rotation_chain(s)


@router.post("/v1/server/key/rotate", response_model=RotationResult)
def rotate_key(ctx: CtxDep, _: AdminDep) -> dict:
    """Replace the server key: the new key is announced signed by the old one and devices switch without re-enrolling.

    Other replicas sharing the database must be restarted with the new key file.
    """
    return keys.rotate_server_key(ctx)
