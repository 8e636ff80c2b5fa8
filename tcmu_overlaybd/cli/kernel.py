"""The kernel-path commands: ``mount``, ``umount``, ``list``, ``recover``, ``doctor``."""

from __future__ import annotations

import json
import signal

import click

from ..errors import KernelError
from ..image.options import OpenOptions
from .options import image_options


@click.command("mount")
@click.argument("image")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--upper", default=None, type=click.Path(file_okay=False),
              help="Directory that receives the writes (default: a fresh one under state.upperDir, "
                   "removed by umount).")
@click.option("-f", "--foreground", is_flag=True,
              help="Stay in the foreground; Ctrl-C unmounts.")
@click.option("--raw", is_flag=True, help="IMAGE is a raw disk image file (ext4), not a reference.")
@click.option("--record-trace", "record_trace", default=None, metavar="FILE", type=click.Path(dir_okay=False),
              help="Record the blocks the workload reads; FILE is written by obd umount or "
                   "obd record-trace stop.")
@click.option("--prefetch", "prefetch", default=None, metavar="FILE",
              type=click.Path(exists=True, dir_okay=False),
              help="Once mounted, fetch a trace's ranges (or a prefetch list's files) in the background.")
@click.option("--prefetch-list", "prefetch_list", default=None, metavar="FILE",
              type=click.Path(exists=True, dir_okay=False),
              help="Like --prefetch, FILE being a list of paths (one per line, directories end with /).")
@click.option("--background-download/--no-background-download", "background", default=None,
              help="Download the whole image into the cache after prefetch.backgroundDelay, at most "
                   "prefetch.backgroundRateMBps (default: prefetch.background).")
@image_options
def mount_cmd(image: str, mountpoint: str, upper: str | None, foreground: bool, raw: bool,
              record_trace: str | None, prefetch: str | None, prefetch_list: str | None,
              background: bool | None, opts: OpenOptions) -> None:
    """Mount IMAGE as a writable rootfs on MOUNTPOINT (ext4 read-only + overlayfs)."""
    from ..mount import mounter
    from ..prefetch import session

    session.configure(opts, record_trace=record_trace, prefetch=prefetch, prefetch_list=prefetch_list,
                      background=background, raw=raw)
    stop: list = []
    if foreground:  # before mounting: a Ctrl-C at any point then unmounts cleanly
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.append(True))
    try:
        st = mounter.mount(image, mountpoint, opts, upper=upper, raw=raw, persist=not foreground)
    except BaseException:
        session.abandon(opts)
        raise
    click.echo(st.mountpoint)
    if foreground:
        mounter.foreground(st, stop)


@click.command("umount")
@click.argument("mountpoint", type=click.Path(file_okay=False))
def umount_cmd(mountpoint: str) -> None:
    """Unmount MOUNTPOINT and remove its device, LUN, backstore, handler and mount record
    (of a mount that is not active, only the record)."""
    from ..mount import mounter
    from ..prefetch import session

    st = mounter.umount(mountpoint)
    session.after_umount(getattr(st, "options", None) or {})  # a trace its dead handler left unwritten


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of mounts.")
def list_cmd(as_json: bool) -> None:
    """Show obd mounts: mountpoint, device, handler pid, status, image.

    STATUS is ``active``, ``handler dead`` (obd recover restarts it), ``starting``, or
    ``not active``: recorded before a restart and not mounted now (obd recover re-creates it).
    """
    from ..mount import mounter

    mounts = mounter.list_mounts()
    if as_json:
        click.echo(json.dumps(mounts, indent=1))
        return
    if not mounts:
        return
    click.echo(f"{'MOUNTPOINT':30} {'DEVICE':10} {'HANDLER':>8} {'RESTARTS':>8}  {'STATUS':12} IMAGE")
    for m in mounts:
        pid = str(m["handler_pid"]) if m["handler_alive"] else "-"
        click.echo(f"{m['mountpoint']:30} {m['device'] or '-':10} {pid:>8} {m['restarts']:>8}  "
                   f"{m['status']:12} {m['image']}")


@click.command("recover")
def recover_cmd() -> None:
    """Bring back obd mounts after a crash or a reboot: restart dead handlers, re-create
    recorded mounts (same upper directory).  One line per mount acted on."""
    from ..mount import mounter

    failed = 0
    for mountpoint, outcome in mounter.recover():
        click.echo(f"{mountpoint}: {outcome}")
        failed += outcome.startswith("failed")
    if failed:
        raise KernelError(f"{failed} mount(s) could not be recovered")


@click.command("doctor")
def doctor_cmd() -> None:
    """Check that this host can run obd mount, and say what to do if not."""
    from ..lio import host

    bad = 0
    for c in host.checks():
        click.echo(f"{'ok  ' if c.ok else 'FAIL'} {c.what}" + ("" if c.ok else f": {c.fix}"))
        bad += not c.ok
    if bad:
        raise KernelError(f"{bad} check(s) failed")


def register(group) -> None:
    """Attach this module's commands to the ``obd`` group."""
    for cmd in (mount_cmd, umount_cmd, list_cmd, recover_cmd, doctor_cmd):
        group.add_command(cmd)
