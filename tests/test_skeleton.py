"""The pieces every module relies on: raw CRC-32C, references, the error boundary."""

import pytest

from tcmu_overlaybd.cli.main import main
from tcmu_overlaybd.crc32c import crc32c_extend, crc32c_raw
from tcmu_overlaybd.errors import UsageError
from tcmu_overlaybd.image.reference import parse_reference


def test_crc32c_raw_known_answers():
    assert crc32c_raw(b"123456789") == 0x58E3FA20
    assert crc32c_raw(b"123456789", 100007) == 0x3C9BD4E0
    assert crc32c_extend(b"6789", crc32c_raw(b"12345")) == 0x58E3FA20


@pytest.mark.parametrize(
    "text,registry,repo,tag,digest",
    [
        ("busybox", "docker.io", "library/busybox", "latest", None),
        ("user/app:1.0", "docker.io", "user/app", "1.0", None),
        ("localhost:5000/a/b:t", "localhost:5000", "a/b", "t", None),
        ("reg.example.com/x@sha256:" + "a" * 64, "reg.example.com", "x", None, "sha256:" + "a" * 64),
        ("127.0.0.1:5000/x:v1@sha256:" + "b" * 64, "127.0.0.1:5000", "x", "v1", "sha256:" + "b" * 64),
    ],
)
def test_registry_references(text, registry, repo, tag, digest):
    r = parse_reference(text)
    assert (r.transport, r.registry, r.repository, r.tag, r.digest) == ("docker", registry, repo, tag, digest)


def test_oci_layout_references():
    r = parse_reference("oci:/var/images/hello:amd64-converted")
    assert (r.transport, r.path, r.tag) == ("oci", "/var/images/hello", "amd64-converted")
    r = parse_reference("oci:relative/dir")
    assert (r.path, r.tag) == ("relative/dir", None)


@pytest.mark.parametrize("bad", ["", "UPPER/case", "a@sha256:zz", "x:bad tag", " spaced"])
def test_bad_references_are_usage_errors(bad):
    with pytest.raises(UsageError):
        parse_reference(bad)


def test_cli_unknown_command_exits_nonzero(capsys):
    assert main(["no-such-command"]) != 0
