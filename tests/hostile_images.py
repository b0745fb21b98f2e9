#!/usr/bin/env python3
"""Write hostile images for tests/hostile.rs: OCI layouts, docker archives, squashfs and
SIF files that try to escape, lie or are broken, plus two that are merely extreme (100 000
tiny files, a huge sparse file). Each case is a directory or file under OUT, listed in
OUT/cases.json with the reference to import and the words its error must hold.

Usage: hostile_images.py OUT BUSYBOX_TREE BUSYBOX_SQSH SIF_FIXTURE
"""
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

OUT, BUSYBOX, BUSYBOX_SQSH, SIF = sys.argv[1:5]
OUTSIDE = os.path.join(OUT, "outside")  # must stay empty whatever is imported
cases = []


def tar_of(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for e in entries:
            info = tarfile.TarInfo(e["name"])
            info.type = e.get("type", tarfile.REGTYPE)
            info.mode = e.get("mode", 0o644)
            info.linkname = e.get("link", "")
            data = e.get("data", b"")
            info.size = len(data) if info.type == tarfile.REGTYPE else 0
            t.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return buf.getvalue()


BASE = None


def base_layer():
    global BASE
    if BASE is None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
            t.add(BUSYBOX, arcname=".")
        BASE = gzip.compress(buf.getvalue(), mtime=0)
    return BASE


def sha(b):
    return hashlib.sha256(b).hexdigest()


def layout(name, layers, media=None, config=None, blob_override=None, manifest_bytes=None,
           index_bytes=None, config_bytes=None, skip_blobs=()):
    """An OCI layout NAME with the busybox base and `layers` (tar bytes, compressed as
    given by `media`), tag v1. The overrides write broken documents or blobs."""
    d = os.path.join(OUT, name)
    blobs = os.path.join(d, "blobs", "sha256")
    os.makedirs(blobs)
    all_layers = [(base_layer(), "application/vnd.oci.image.layer.v1.tar+gzip")]
    for i, l in enumerate(layers):
        all_layers.append((l, (media or {}).get(i, "application/vnd.oci.image.layer.v1.tar")))

    def put(b):
        h = sha(b)
        if h not in skip_blobs:
            with open(os.path.join(blobs, h), "wb") as f:
                f.write((blob_override or {}).get(h, b))
        return h

    cfg = config_bytes if config_bytes is not None else json.dumps(config or {
        "architecture": "amd64", "os": "linux", "config": {"Env": ["PATH=/bin:/usr/bin"]},
        "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    c = put(cfg)
    descs = [{"mediaType": m, "digest": "sha256:" + put(l), "size": len(l)} for l, m in all_layers]
    mf = manifest_bytes if manifest_bytes is not None else json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + c,
                   "size": len(cfg)},
        "layers": descs}).encode()
    m = put(mf)
    idx = index_bytes if index_bytes is not None else json.dumps({
        "schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + m,
            "size": len(mf), "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}).encode()
    with open(os.path.join(d, "index.json"), "wb") as f:
        f.write(idx)
    with open(os.path.join(d, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    return d


def case(name, ref, expect, ok=False, check=None):
    cases.append({"name": name, "ref": ref, "expect": expect, "ok": ok, "check": check})


def oci(name, *args, expect, ok=False, check=None, **kw):
    d = layout(name, *args, **kw)
    case(name, f"oci:{d}:v1", expect, ok, check)


os.makedirs(OUTSIDE)

# ---- escapes ---------------------------------------------------------------------------
oci("dotdot", [tar_of([{"name": "../../escape", "data": b"x"}])], expect="'..'")
oci("dotdot-inner", [tar_of([{"name": "etc/../../escape", "data": b"x"}])], expect="'..'")
oci("symlink-then-write", [tar_of([
    {"name": "evil", "type": tarfile.SYMTYPE, "link": OUTSIDE},
    {"name": "evil/planted", "data": b"x"}])], expect="written through it")
oci("symlink-dotdot-then-write", [tar_of([
    {"name": "up", "type": tarfile.SYMTYPE, "link": "../../../../../../" + OUTSIDE.lstrip("/")},
    {"name": "up/planted", "data": b"x"}])], expect="written through it")
oci("hardlink-out", [tar_of([
    {"name": "passwd", "type": tarfile.LNKTYPE, "link": "../../../../../../etc/passwd"}])],
    expect="'..'")
oci("hardlink-absolute", [tar_of([
    {"name": "shadow", "type": tarfile.LNKTYPE, "link": "/etc/shadow"}])], expect="shadow")
oci("whiteout-dotdot", [tar_of([{"name": "etc/.wh..."}])], expect="whiteout")
oci("whiteout-dotdot-root", [tar_of([{"name": ".wh..."}])], expect="whiteout")
# An absolute name is relative to the image's root, as Docker reads it: it stays inside.
oci("absolute-name", [tar_of([{"name": "/inside-abs", "data": b"abs\n"}])], expect="", ok=True,
    check=["cat /inside-abs", "abs\n"])

# ---- broken data -----------------------------------------------------------------------
good = tar_of([{"name": "data/file", "data": os.urandom(300000)}])
gz = gzip.compress(good, mtime=0)
oci("truncated-gzip", [gz[: len(gz) // 2]], media={0: "application/vnd.oci.image.layer.v1.tar+gzip"},
    expect="layer")
zst = subprocess.run(["zstd", "-q", "-c"], input=good, stdout=subprocess.PIPE, check=True).stdout
oci("truncated-zstd", [zst[: len(zst) // 2]], media={0: "application/vnd.oci.image.layer.v1.tar+zstd"},
    expect="layer")
oci("digest-mismatch", [good], blob_override={sha(good): good[:-1] + b"!"}, expect="digest")
oci("missing-blob", [good], skip_blobs=(sha(good),), expect=sha(good)[:12])
oci("bad-index-json", [good], index_bytes=b'{"schemaVersion":2,"manifests":[{', expect="index.json")
oci("bad-manifest-json", [good], manifest_bytes=b'{"schemaVersion":2,"layers":7}', expect="manifest")
oci("bad-config-json", [good], config_bytes=b'{"config":{"Env":"not a list"}}', expect="config")

# ---- docker archives whose manifest.json lies ------------------------------------------
def docker_archive(name, manifest, members):
    path = os.path.join(OUT, name + ".tar")
    with open(path, "wb") as f:
        f.write(tar_of([{"name": "manifest.json", "data": json.dumps(manifest).encode()}] + members))
    case(name, f"docker-archive:{path}", None)
    return path


layer = tar_of([{"name": "etc/marker", "data": b"x"}])
cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                  "rootfs": {"type": "layers", "diff_ids": ["sha256:" + sha(layer)]}}).encode()
cname = sha(cfg) + ".json"
docker_archive("archive-missing-layer", [{"Config": cname, "Layers": ["nope/layer.tar"]}],
               [{"name": cname, "data": cfg}])
cases[-1]["expect"] = "nope/layer.tar"
docker_archive("archive-missing-config", [{"Config": "missing.json", "Layers": ["l/layer.tar"]}],
               [{"name": "l/layer.tar", "data": layer}])
cases[-1]["expect"] = "missing.json"
docker_archive("archive-dotdot-member", [{"Config": cname, "Layers": ["../../etc/passwd"]}],
               [{"name": cname, "data": cfg}])
cases[-1]["expect"] = "../../etc/passwd"
docker_archive("archive-wrong-diff-id", [{"Config": cname, "Layers": ["l/layer.tar"]}],
               [{"name": cname, "data": cfg}, {"name": "l/layer.tar", "data": layer + b"\0" * 1024}])
cases[-1]["expect"] = "is corrupt"
docker_archive("archive-no-images", [], [])
cases[-1]["expect"] = "manifest.json"

# ---- squashfs and SIF ------------------------------------------------------------------
with open(BUSYBOX_SQSH, "rb") as f:
    sq = f.read()
p = os.path.join(OUT, "truncated.sqsh")
with open(p, "wb") as f:
    f.write(sq[: len(sq) // 2])
case("truncated-squashfs", p, "truncated")
p = os.path.join(OUT, "garbage.sqsh")
with open(p, "wb") as f:
    f.write(b"hsqs" + os.urandom(4096))
case("garbage-squashfs", p, "squashfs")

with open(SIF, "rb") as f:
    sif = bytearray(f.read())
descr = int.from_bytes(sif[96:104], "little")


def d(i):
    return descr + i * 585


def sif_case(name, patch, expect):
    b = bytearray(sif)
    patch(b)
    p = os.path.join(OUT, name + ".sif")
    with open(p, "wb") as f:
        f.write(b)
    case(name, p, expect)


sif_case("sif-offset-past-end", lambda b: b.__setitem__(slice(d(1) + 17, d(1) + 25), (1 << 40).to_bytes(8, "little")),
         "past the end")
sif_case("sif-overlapping", lambda b: b.__setitem__(slice(d(0) + 17, d(0) + 25), b[d(1) + 17:d(1) + 25]), "overlap")
sif_case("sif-negative-size", lambda b: b.__setitem__(slice(d(1) + 25, d(1) + 33), (-1).to_bytes(8, "little", signed=True)),
         "negative")
sif_case("sif-descriptors-past-end", lambda b: b.__setitem__(slice(96, 104), (len(b) - 10).to_bytes(8, "little")),
         "descriptor table")

# ---- extreme but valid -----------------------------------------------------------------
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
    for i in range(100):
        info = tarfile.TarInfo(f"many/{i:02}")
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        t.addfile(info)
        for j in range(1000):
            info = tarfile.TarInfo(f"many/{i:02}/{j:03}")
            info.size = 1
            t.addfile(info, io.BytesIO(b"x"))
oci("many-files", [gzip.compress(buf.getvalue(), compresslevel=1, mtime=0)],
    media={0: "application/vnd.oci.image.layer.v1.tar+gzip"}, expect="", ok=True,
    check=["find /many -type f | wc -l", "100000\n"])

sparse_dir = os.path.join(OUT, "sparse-src")
os.makedirs(sparse_dir)
with open(os.path.join(sparse_dir, "huge"), "wb") as f:
    f.truncate(8 << 30)
    f.seek(4 << 30)
    f.write(b"middle")
sparse_tar = subprocess.run(["tar", "--sparse", "-C", sparse_dir, "-cf", "-", "huge"],
                            stdout=subprocess.PIPE, check=True).stdout
shutil.rmtree(sparse_dir)
oci("huge-sparse", [sparse_tar], expect="", ok=True,
    check=["stat -c %s /huge; dd if=/huge bs=1 skip=4294967296 count=6 2>/dev/null; echo",
           f"{8 << 30}\nmiddle\n"])

with open(os.path.join(OUT, "cases.json"), "w") as f:
    json.dump(cases, f, indent=1)
