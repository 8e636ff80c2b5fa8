"""Read an ext4 image back into a reference-tree description with e2fsprogs' debugfs.

Independent of obd's own code: listing (``ls -p -r``), ``stat`` (device
numbers, fast symlink targets, xattr names, times), ``dump`` (contents, slow
symlink targets) and ``ea_get -f`` (xattr values), each batch in one debugfs
process.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import tempfile

from .reference_tree import Node

_TYPES = {stat.S_IFREG: "reg", stat.S_IFDIR: "dir", stat.S_IFLNK: "sym", stat.S_IFCHR: "chr", stat.S_IFBLK: "blk", stat.S_IFIFO: "fifo"}


def _q(path: str) -> str:
    assert '"' not in path and "\n" not in path, path
    return f'"{path}"'


def debugfs_batch(image: str, commands: list[str]) -> list[str]:
    """Run commands in one debugfs; returns each command's output text."""
    script = "".join(c + "\n" for c in commands).encode("utf-8", "surrogateescape")
    res = subprocess.run(["debugfs", "-f", "-", image], input=script, capture_output=True, check=True)
    text = res.stdout.decode("utf-8", "surrogateescape")
    parts = re.split(r"^debugfs: .*\n", text, flags=re.M)[1:]
    assert len(parts) == len(commands), (len(parts), len(commands), res.stderr[-500:])
    return parts


def stat_fields(out: str) -> dict:
    """The fields a test compares from a debugfs ``stat`` output."""
    fields: dict = {"xattr_names": []}
    m = re.search(r"mtime: 0x([0-9a-f]+):([0-9a-f]+)", out)
    if m:
        fields["mtime"] = int(m.group(1), 16)
        fields["mtime_extra"] = int(m.group(2), 16)
    m = re.search(r"Device major/minor number: ([0-9a-f]+):([0-9a-f]+) \(hex", out)
    if m:
        fields["rdev"] = (int(m.group(1)), int(m.group(2)))
    m = re.search(r'^Fast link dest: "(.*)"$', out, flags=re.M)
    if m:
        fields["fast_link"] = m.group(1)
    m = re.search(r"^Links: (\d+)", out, flags=re.M)
    fields["links"] = int(m.group(1)) if m else 0
    if "Extended attributes:" in out:
        section = out.split("Extended attributes:", 1)[1]
        for line in section.splitlines()[1:] if section.startswith("\n") else section.splitlines():
            m = re.match(r"^  (\S+) \(\d+\)", line)
            if not m:
                break
            fields["xattr_names"].append(m.group(1))
    return fields


def read_tree(image: str, skip: tuple[str, ...] = ("/lost+found",)) -> dict[str, Node]:
    """Every path of the filesystem in ``image`` as reference-tree nodes."""
    entries: dict[str, tuple[int, int, int, int]] = {"/": (2, 0o40755, 0, 0)}
    todo = ["/"]
    while todo:
        outs = debugfs_batch(image, [f"ls -p -r {_q(d)}" for d in todo])
        nxt = []
        for d, out in zip(todo, outs):
            for line in out.splitlines():
                if not line.startswith("/"):
                    continue
                _, ino, mode, uid, gid, rest = line.split("/", 5)
                name = rest.rsplit("/", 2)[0]
                if int(ino) == 0:  # an unused slot left by a removed entry
                    continue
                if name in (".", ".."):
                    if name == "." and d == "/":
                        entries["/"] = (int(ino), int(mode, 8), int(uid), int(gid))
                    continue
                path = (d.rstrip("/") + "/" + name)
                if path in skip:
                    continue
                entries[path] = (int(ino), int(mode, 8), int(uid), int(gid))
                if stat.S_ISDIR(int(mode, 8)):
                    nxt.append(path)
        todo = nxt
    paths = sorted(entries)
    stats = dict(zip(paths, (stat_fields(o) for o in debugfs_batch(image, [f"stat {_q(p)}" for p in paths]))))
    tree: dict[str, Node] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cmds = []
        for i, p in enumerate(paths):
            _ino, mode, _u, _g = entries[p]
            if stat.S_ISREG(mode) or (stat.S_ISLNK(mode) and "fast_link" not in stats[p]):
                cmds.append(f"dump {_q(p)} {tmp}/d{i}")
            for j, name in enumerate(stats[p]["xattr_names"]):
                cmds.append(f"ea_get -f {tmp}/x{i}_{j} {_q(p)} {name}")
        if cmds:
            debugfs_batch(image, cmds)

        def blob(name: str) -> bytes:
            with open(os.path.join(tmp, name), "rb") as f:
                return f.read()

        for i, p in enumerate(paths):
            _ino, mode, uid, gid = entries[p]
            st = stats[p]
            kind = _TYPES[stat.S_IFMT(mode)]
            xattrs = tuple(sorted((n, blob(f"x{i}_{j}")) for j, n in enumerate(st["xattr_names"])))
            common = dict(mode=stat.S_IMODE(mode), uid=uid, gid=gid, xattrs=xattrs)
            if kind == "reg":
                data = blob(f"d{i}")
                tree[p] = Node("reg", size=len(data), sha256=hashlib.sha256(data).hexdigest(), **common)
            elif kind == "sym":
                link = st["fast_link"] if "fast_link" in st else blob(f"d{i}").decode("utf-8", "surrogateescape")
                tree[p] = Node("sym", link=link, size=len(link.encode("utf-8", "surrogateescape")), **common)
            elif kind in ("chr", "blk"):
                tree[p] = Node(kind, rdev=st["rdev"], **common)
            else:
                tree[p] = Node(kind, **common)
    return tree


def fsck_clean(image: str) -> tuple[int, str]:
    """``e2fsck -fn`` exit status and output."""
    res = subprocess.run(["e2fsck", "-fn", image], capture_output=True, text=True)
    return res.returncode, res.stdout + res.stderr
