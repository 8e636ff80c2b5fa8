"""Commands that read an image without the kernel: ``inspect``, ``export``, ``ls``, ``cat``."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import stat as _stat
import sys

import click

from ..errors import UsageError
from ..image.manifest import Image
from ..image.options import OpenOptions
from ..image.resolve import open_image
from ..progress import progress_bar
from .options import image_options

CAT_CHUNK = 1 << 20


@contextlib.contextmanager
def _opened_image(ref: str, opts: OpenOptions):
    image = open_image(ref, opts)
    try:
        yield image
    finally:
        image.store.close()


@contextlib.contextmanager
def _opened_disk(image: Image, opts: OpenOptions):
    from ..image.disk import open_disk

    disk = open_disk(image, opts)
    try:
        yield disk
    finally:
        disk.close()


@contextlib.contextmanager
def _opened_fs(ref: str, opts: OpenOptions):
    from ..ext4.fs import Ext4

    with _opened_image(ref, opts) as image, _opened_disk(image, opts) as disk:
        yield Ext4(disk)


# -- inspect -----------------------------------------------------------------------------------

def describe(image: Image, opts: OpenOptions) -> dict:
    """What ``obd inspect --json`` prints: mode, platform, layers and the virtual disk size."""
    info = {
        "reference": str(image.reference),
        "mode": image.mode,
        "platform": image.platform,
        "manifest": image.manifest_descriptor.to_json(),
        "index": image.index_descriptor.to_json() if image.index_descriptor else None,
        "layers": [],
        "virtual_size": None,
    }
    for layer in image.layers:
        d = layer.descriptor
        entry = {"kind": layer.kind, "mediaType": d.media_type, "digest": d.digest, "size": d.size}
        if layer.target is not None:
            entry["target"] = {"digest": layer.target.digest, "mediaType": layer.target.media_type}
        info["layers"].append(entry)
    if image.mode != "oci":
        from ..block.stack import StackedDisk
        from ..image.disk import open_layers

        layers = open_layers(image, opts)
        try:
            disk = StackedDisk(layers)
        except BaseException:
            for layer in layers:
                layer.close()
            raise
        with contextlib.closing(disk):
            data_entries = [e for e in info["layers"] if e["kind"] != "acceleration"]
            for entry, layer in zip(data_entries, layers):
                entry["vsize"] = layer.vsize
                entry["uuid"] = layer.uuid
            info["virtual_size"] = disk.size
    return info


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@click.command()
@click.argument("image")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@image_options
def inspect(image: str, as_json: bool, opts: OpenOptions) -> None:
    """Show an image's mode, layers and virtual disk size."""
    with _opened_image(image, opts) as img:
        info = describe(img, opts)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"image:    {info['reference']}")
    click.echo(f"manifest: {info['manifest']['digest']}")
    click.echo(f"platform: {info['platform']}")
    click.echo(f"mode:     {info['mode']}")
    if info["virtual_size"] is not None:
        click.echo(f"disk:     {info['virtual_size']} bytes ({_human(info['virtual_size'])})")
    click.echo("layers:")
    for i, layer in enumerate(info["layers"]):
        click.echo(f"  {i:>2} {layer['kind']:<12} {layer['digest']} {layer['size']:>12}  {layer['mediaType']}")
        if layer.get("uuid"):
            click.echo(f"     uuid         {layer['uuid']}")
        if "target" in layer:
            click.echo(f"     target       {layer['target']['digest']}  {layer['target']['mediaType']}")


# -- export ------------------------------------------------------------------------------------

@click.command()
@click.argument("image")
@click.argument("out", type=click.Path(dir_okay=False, writable=True))
@image_options
def export(image: str, out: str, opts: OpenOptions) -> None:
    """Write the image's virtual disk to OUT as a sparse raw file."""
    from ..block.export import export_raw

    partial = out + ".partial"
    with _opened_image(image, opts) as img, _opened_disk(img, opts) as disk:
        try:
            # export_raw reports progress over the mapped, non-zeroed extents only
            total = sum(length for _, length, zeroed, _ in disk.extents() if not zeroed)
            with progress_bar(total, f"export {os.path.basename(out)}", quiet=opts.quiet) as bar:
                export_raw(disk, partial, progress=lambda done: bar.update(done - bar.n))
            os.replace(partial, out)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
            raise


# -- ls ----------------------------------------------------------------------------------------

def _entry_info(fs, name: str, inode) -> dict:
    st = fs.stat(inode)
    info = {
        "name": name, "type": st.type, "mode": f"{_stat.S_IMODE(st.mode):04o}", "size": st.size,
        "uid": st.uid, "gid": st.gid, "nlink": st.nlink, "mtime_ns": st.mtime_ns, "ino": st.ino,
    }
    if st.type == "l":
        info["target"] = fs.readlink(inode)
    if st.rdev is not None:
        info["rdev"] = list(st.rdev)
    return info


def _long_line(info: dict) -> str:
    mode = _stat.filemode(int(info["mode"], 8) | {
        "-": _stat.S_IFREG, "d": _stat.S_IFDIR, "l": _stat.S_IFLNK, "c": _stat.S_IFCHR,
        "b": _stat.S_IFBLK, "p": _stat.S_IFIFO, "s": _stat.S_IFSOCK}.get(info["type"], 0))
    size = f"{info['rdev'][0]}, {info['rdev'][1]}" if "rdev" in info else str(info["size"])
    when = datetime.datetime.fromtimestamp(info["mtime_ns"] // 1_000_000_000, datetime.timezone.utc)
    line = f"{mode} {info['nlink']:>3} {info['uid']:>5} {info['gid']:>5} {size:>10} {when:%Y-%m-%d %H:%M} {info['name']}"
    if "target" in info:
        line += f" -> {info['target']}"
    return line


@click.command(name="ls")
@click.argument("image")
@click.argument("path", default="/")
@click.option("-l", "long", is_flag=True, help="Long listing: type, mode, links, owner, size, time.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@image_options
def ls_cmd(image: str, path: str, long: bool, as_json: bool, opts: OpenOptions) -> None:
    """List a directory (or one file) inside the image without mounting it."""
    detailed = long or as_json
    with _opened_fs(image, opts) as fs:
        inode = fs.lookup(path, follow=True)
        if inode.is_dir:
            entries = [(e.name, e.ino) for e in sorted(fs.listdir(inode), key=lambda e: e.raw_name)]
        else:
            entries = [(path, fs.lookup(path, follow=False).ino)]
        if not detailed:  # names only: no inode reads
            for name, _ in entries:
                _echo(name)
            return
        infos = [_entry_info(fs, name, fs.inode(ino)) for name, ino in entries]
    if as_json:
        click.echo(json.dumps(infos, indent=2))
    else:
        for info in infos:
            _echo(_long_line(info))


def _echo(text: str) -> None:
    """One line of output; names that are not UTF-8 are written back as their raw bytes."""
    click.echo(text.encode("utf-8", "surrogateescape"))


# -- cat ---------------------------------------------------------------------------------------

@click.command()
@click.argument("image")
@click.argument("path")
@image_options
def cat(image: str, path: str, opts: OpenOptions) -> None:
    """Write a file from inside the image to stdout (streamed, never loaded whole)."""
    out = sys.stdout.buffer
    with _opened_fs(image, opts) as fs:
        inode = fs.lookup(path, follow=True)
        if inode.is_dir:
            raise UsageError(f"{path}: is a directory")
        if not inode.is_reg:
            raise UsageError(f"{path}: not a regular file")
        with fs.open(inode) as f:
            while True:
                chunk = f.read(CAT_CHUNK)
                if not chunk:
                    break
                out.write(chunk)
        out.flush()


def register(group) -> None:
    """Attach ``inspect``, ``export``, ``ls`` and ``cat`` to the ``obd`` group."""
    for command in (inspect, export, ls_cmd, cat):
        group.add_command(command)
