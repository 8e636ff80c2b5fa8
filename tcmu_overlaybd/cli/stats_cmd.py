"""``obd stats [MOUNTPOINT] [--json]``: what a mount's handler has done (stats/telemetry.py)."""

from __future__ import annotations

import json

import click

from .. import config
from ..errors import StateError
from ..mount.state import MountState, RecordDir, StateDir, pid_alive
from ..stats.telemetry import stats_socket_path
from ..stats.unix_endpoint import query


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    h, rest = divmod(s, 3600)
    return f"{h}h{rest // 60:02d}m{rest % 60:02d}s" if h else f"{rest // 60}m{rest % 60:02d}s"


def mount_stats(sd: StateDir, st: MountState) -> dict:
    """The stats document of one mount's handler; StateError when it cannot answer."""
    if not pid_alive(sd.read_pids(st.id)["handler_pid"]):
        raise StateError(f"{st.mountpoint}: the handler is not running (run obd recover)")
    return query(stats_socket_path(sd.path, st.id))


def render_text(doc: dict) -> str:
    """The human form of one stats document."""
    lat = doc["latency_ms"]
    lines = [
        doc["mountpoint"],
        f"  image     {doc['image']}",
        f"  handler   pid {doc['handler_pid']}, up {_duration(doc['uptime_s'])}, {doc['restarts']} restarts",
        f"  reads     {doc['device_reads']} ({_human(doc['device_bytes_read'])}), {doc['inflight_reads']} in flight, "
        f"{doc['slow_reads']} slow (> {doc['slow_ms']:g} ms), {doc['stuck_reads']} stuck, {doc['read_errors']} errors",
        f"  latency   p50 {lat['p50']:.3f} ms  p90 {lat['p90']:.3f} ms  p99 {lat['p99']:.3f} ms  "
        f"max {lat['max']:.3f} ms",
    ]
    if doc.get("bytes_fetched") is not None:
        lines.append(f"  registry  {_human(doc['bytes_fetched'])} fetched in {doc['fetch_requests']} requests")
    cache = doc.get("cache")
    if cache:
        ratio = "-" if cache.get("hit_ratio") is None else f"{100 * cache['hit_ratio']:.1f}%"
        lines.append(f"  cache     {cache['hits']} hits, {cache['misses']} misses, hit ratio {ratio}")
    gz = doc.get("gzip_cache")
    if gz:
        ratio = "-" if gz.get("hit_ratio") is None else f"{100 * gz['hit_ratio']:.1f}%"
        lines.append(f"  gzip      {gz['hits']} hits, {gz['misses']} misses, hit ratio {ratio}, "
                     f"{gz.get('spans_inflated', 0)} spans inflated")
    if doc.get("prefetch"):
        lines.append("  prefetch  " + ", ".join(f"{k} {v}" for k, v in doc["prefetch"].items()))
    if doc.get("metrics_address"):
        lines.append(f"  metrics   http://{doc['metrics_address']}/metrics")
    return "\n".join(lines)


@click.command("stats")
@click.argument("mountpoint", required=False, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON document (an array without MOUNTPOINT).")
def stats_cmd(mountpoint: str | None, as_json: bool) -> None:
    """Reads, bytes fetched, cache hit ratio, slow I/Os and latency of MOUNTPOINT (default: every mount)."""
    cfg = config.load()
    sd = StateDir(cfg["state.dir"])
    if mountpoint is not None:
        st = sd.find_mountpoint(mountpoint)
        if st is None:
            if RecordDir(cfg["state.persistDir"]).find_mountpoint(mountpoint) is not None:
                raise StateError(f"{mountpoint}: not mounted since the last reboot (run obd recover)")
            raise StateError(f"{mountpoint} is not an obd mount")
        doc = mount_stats(sd, st)
        click.echo(json.dumps(doc, indent=1) if as_json else render_text(doc))
        return
    docs = []
    for st in sd.all():
        try:
            docs.append(mount_stats(sd, st))
        except StateError as e:
            docs.append({"mount_id": st.id, "mountpoint": st.mountpoint, "image": st.image, "error": str(e)})
    if as_json:
        click.echo(json.dumps(docs, indent=1))
        return
    if docs:
        click.echo("\n\n".join(f"{d['mountpoint']}\n  error     {d['error']}" if "error" in d else render_text(d)
                                 for d in docs))


def register(group: click.Group) -> None:
    group.add_command(stats_cmd)
