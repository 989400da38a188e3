"""Routes for a reverse proxy in front of the replicas (packaging/nginx/edgekit.conf, docs/server.md)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from fleet_server.deps import AnyPrincipalDep, CtxDep
from fleet_server.errors import ArtifactDamaged, NotFound
from fleet_server.services.artifacts import authorize_artifact

router = APIRouter(tags=["proxy"])


@router.get("/v1/artifacts/{sha256}/access", status_code=204, response_class=Response,
            responses={204: {"description": "The caller may fetch this artifact."}})
def artifact_access(sha256: str, ctx: CtxDep, principal: AnyPrincipalDep) -> Response:
    """A caching proxy's ``auth_request``: 204 when this token may fetch the artifact, 401/403 when not.

    Checks exactly what ``GET /v1/artifacts/{sha256}`` checks, without sending bytes, so a proxy cache
    serves an artifact only to a caller the server would serve it to. An artifact the server does not
    have (or holds damaged) is not an authorization question: 204, and the proxied download then gets
    the server's 404 or 410 (a proxy cache only ever holds bytes the server served with 200).
    """
    try:
        authorize_artifact(ctx, principal, sha256)
    except (NotFound, ArtifactDamaged):
        pass
    return Response(status_code=204)
