"""Trace commands: ``obd record-trace stop``, ``obd trace show``, ``obd trace push`` (spec §7)."""

from __future__ import annotations

import json
import os
import signal
import time

import click

from ..errors import KernelError, StateError, UsageError
from ..image.options import OpenOptions
from .options import image_options

#: seconds ``record-trace stop`` waits for the handler to write the trace
STOP_TIMEOUT_S = 30.0


@click.group("record-trace")
def record_trace_group() -> None:
    """Control the trace recording of a mount (started by obd mount --record-trace FILE)."""


@record_trace_group.command("stop")
@click.argument("mountpoint", type=click.Path(file_okay=False))
def record_stop_cmd(mountpoint: str) -> None:
    """Write the trace of MOUNTPOINT now and stop recording (the mount goes on)."""
    from ..format.trace import decode_trace
    from ..mount import mounter
    from ..mount.state import pid_alive
    from ..prefetch import record

    sd = mounter.state_dir()
    st = sd.find_mountpoint(mountpoint)
    if st is None:
        raise StateError(f"{mountpoint} is not an obd mount")
    path = st.options.get("record_trace")
    if not path:
        raise UsageError(f"{mountpoint} was not mounted with --record-trace")
    spool = record.spool_path(path)
    if not os.path.exists(spool):
        raise StateError(f"{mountpoint}: the recording is already finished ({path})")
    pid = sd.read_pids(st.id)["handler_pid"]
    if pid and pid_alive(pid):
        os.kill(pid, signal.SIGUSR1)  # the handler flushes, writes the trace, removes the spool
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while os.path.exists(spool) and time.monotonic() < deadline:
            time.sleep(0.05)
        if os.path.exists(spool):
            raise KernelError(f"{mountpoint}: the handler did not write {path} within {STOP_TIMEOUT_S:g} s")
        with open(path, "rb") as f:
            count = len(decode_trace(f.read(), path))
    else:  # no handler: the spool is all there is
        count = record.finish_spool(path)
    click.echo(f"{path}: {count} records")


@click.group("trace")
def trace_group() -> None:
    """Inspect traces and prefetch lists, and store them with an image."""


@trace_group.command("show")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def trace_show_cmd(file: str, as_json: bool) -> None:
    """Print FILE: a trace's records (op, layer, offset, bytes) or a prefetch list's paths."""
    from ..format.trace import load_prefetch_file
    from ..prefetch.session import read_prefetch_file

    spec = load_prefetch_file(read_prefetch_file(file), file)
    if as_json:
        doc = {"kind": spec.kind, "paths": list(spec.paths),
               "records": [{"op": chr(r.op), "layer": r.layer_index, "offset": r.offset, "count": r.count}
                           for r in spec.records]}
        click.echo(json.dumps(doc, indent=1))
        return
    if spec.kind == "list":
        click.echo(f"prefetch list: {len(spec.paths)} paths")
        for p in spec.paths:
            click.echo(p)
        return
    click.echo(f"trace: {len(spec.records)} records, {sum(r.count for r in spec.records)} bytes, "
               f"layers {sorted({r.layer_index for r in spec.records})}")
    for r in spec.records:
        click.echo(f"{chr(r.op)} {r.layer_index:3d} {r.offset:14d} {r.count:10d}")


@trace_group.command("push")
@click.argument("image")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--to", "dest", default=None, metavar="REF",
              help="Tag to push the image with the trace to (same repository; default: IMAGE's tag).")
@image_options
def trace_push_cmd(image: str, file: str, dest: str | None, opts: OpenOptions) -> None:
    """Store FILE (a trace or prefetch list) with IMAGE as its acceleration layer (spec §7.2).

    Mounts of the pushed image replay it without --prefetch."""
    from ..format.trace import load_prefetch_file
    from ..image.push import push_blob, push_manifest
    from ..image.reference import parse_reference
    from ..image.registry import RegistryClient
    from ..image.resolve import open_image
    from ..prefetch import acceleration
    from ..prefetch.session import read_prefetch_file

    data = read_prefetch_file(file)
    load_prefetch_file(data, file)  # a bad trace is refused here, not at every mount
    src = parse_reference(image)
    if src.transport != "docker":
        raise UsageError(f"{image}: obd trace push writes to a registry (give a registry reference)")
    target = parse_reference(dest) if dest else src
    if target.transport != "docker" or (target.registry, target.repository) != (src.registry, src.repository):
        raise UsageError(f"--to {dest}: must name a tag of {src.registry}/{src.repository}")
    if not target.tag:
        raise UsageError(f"--to {dest}: give a tag")
    opts.discover_accelerated = False
    img = open_image(image, opts)
    try:
        if img.mode == "oci":
            raise UsageError(f"{image}: not an overlaybd or FastOCI image (run obd convert first)")
        layer = acceleration.build_layer(data)
        manifest, config, desc = acceleration.append_to_image(img.manifest, img.config, layer)
        config_bytes = json.dumps(config, separators=(",", ":")).encode()
        manifest["config"] = acceleration.config_descriptor(manifest, config_bytes)
        raw = json.dumps(manifest, separators=(",", ":")).encode()
        client = RegistryClient(target.api_host, opts)
        try:
            push_blob(client, target.repository, layer, desc["digest"], desc["size"])
            push_blob(client, target.repository, config_bytes, manifest["config"]["digest"], len(config_bytes))
            digest = push_manifest(client, target.repository, target.tag, raw,
                                   manifest.get("mediaType") or "application/vnd.oci.image.manifest.v1+json")
        finally:
            client.close()
    finally:
        img.store.close()
    click.echo(f"{target.registry}/{target.repository}:{target.tag}@{digest}")


def register(group) -> None:
    """Attach ``record-trace`` and ``trace`` to the ``obd`` group."""
    group.add_command(record_trace_group)
    group.add_command(trace_group)
