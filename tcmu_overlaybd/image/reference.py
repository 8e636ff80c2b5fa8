"""Image references: ``registry/repo:tag``, ``repo@sha256:...``, Docker Hub short names, ``oci:PATH[:TAG]``.

Parsing follows the rules of the docker/distribution reference grammar that
users know from ``docker pull`` and ``skopeo``:

* the first path component is a registry host if it contains ``.`` or ``:`` or
  is ``localhost``; otherwise the registry is Docker Hub (``docker.io``);
* single-component Docker Hub names get ``library/``;
* a missing tag and digest means ``:latest``;
* ``oci:PATH[:TAG]`` names an OCI image layout directory (the tag is the
  ``org.opencontainers.image.ref.name`` annotation in ``index.json``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UsageError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$")


@dataclass(frozen=True)
class Reference:
    """A parsed image reference.

    ``transport`` is ``"docker"`` for registries and ``"oci"`` for layouts.
    For ``oci``, ``path`` is the layout directory and ``tag`` the ref name
    (None = the only manifest in the index).
    """

    transport: str
    registry: str = ""
    repository: str = ""
    tag: str | None = None
    digest: str | None = None
    path: str = ""

    @property
    def api_host(self) -> str:
        """Host to talk to: Docker Hub's API lives on another name than its references."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """The tag or digest to ask the registry for (digest wins)."""
        return self.digest or self.tag or "latest"

    def with_tag(self, tag: str) -> "Reference":
        return Reference(self.transport, self.registry, self.repository, tag, None, self.path)

    def with_digest(self, digest: str) -> "Reference":
        return Reference(self.transport, self.registry, self.repository, None, digest, self.path)

    def __str__(self) -> str:
        if self.transport == "oci":
            return f"oci:{self.path}" + (f":{self.tag}" if self.tag else "") + (
                f"@{self.digest}" if self.digest else ""
            )
        s = f"{self.registry}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def validate_digest(digest: str) -> str:
    if not _DIGEST_RE.match(digest):
        raise UsageError(f"invalid digest {digest!r} (expected algorithm:hex, e.g. sha256:...)")
    algo, _, hexpart = digest.partition(":")
    if algo == "sha256" and not re.fullmatch(r"[a-f0-9]{64}", hexpart):
        raise UsageError(f"invalid sha256 digest {digest!r}")
    return digest


def _parse_oci(rest: str) -> Reference:
    if not rest:
        raise UsageError("oci: reference needs a path, e.g. oci:./layout:tag")
    digest = None
    if "@" in rest:
        rest, digest = rest.rsplit("@", 1)
        validate_digest(digest)
    path, tag = rest, None
    # PATH:TAG -- the tag is after the last ':' unless that ':' belongs to the path
    if ":" in rest:
        head, tail = rest.rsplit(":", 1)
        if tail and "/" not in tail:
            path, tag = head, tail
    if not path:
        raise UsageError(f"oci:{rest}: empty layout path")
    return Reference("oci", path=path, tag=tag, digest=digest)


def parse_reference(text: str) -> Reference:
    """Parse a user-supplied image name; raise UsageError with the reason if it is malformed."""
    if not text or text != text.strip():
        raise UsageError(f"invalid image reference {text!r}")
    if text.startswith("oci:"):
        return _parse_oci(text[4:])
    for prefix in ("docker://",):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    name, digest = text, None
    if "@" in name:
        name, digest = name.split("@", 1)
        validate_digest(digest)
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
        if not _TAG_RE.match(tag):
            raise UsageError(f"invalid tag {tag!r} in {text!r}")
    parts = name.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        registry, repo_parts = parts[0], parts[1:]
    else:
        registry, repo_parts = DOCKER_HUB, parts
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and len(repo_parts) == 1:
        repo_parts = ["library"] + repo_parts
    for comp in repo_parts:
        if not _COMPONENT_RE.match(comp):
            raise UsageError(f"invalid repository name component {comp!r} in {text!r}")
    if not digest and not tag:
        tag = "latest"
    return Reference("docker", registry=registry, repository="/".join(repo_parts), tag=tag, digest=digest)
