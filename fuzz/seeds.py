#!/usr/bin/env python3
"""Write the seed corpus of every fuzz target under fuzz/corpus/<target>/seed-*.

Seeds are small, valid or nearly valid inputs, including the hostile shapes the layer and
archive code must refuse (`..`, absolute names, links out of the tree, whiteouts naming
`..`). libFuzzer's own finds are merged beside them by `integration/fuzz`.
Run: python3 fuzz/seeds.py [SIF_FIXTURES_DIR]
"""
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def tar_bytes(entries, fmt=tarfile.PAX_FORMAT):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for e in entries:
            info = tarfile.TarInfo(e["name"])
            info.type = e.get("type", tarfile.REGTYPE)
            info.mode = e.get("mode", 0o644)
            info.linkname = e.get("link", "")
            info.mtime = 1700000000
            data = e.get("data", b"")
            info.size = len(data) if info.type == tarfile.REGTYPE else 0
            if "size" in e:
                info.size = e["size"]
            t.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return buf.getvalue()


def references():
    for i, r in enumerate([
        "ubuntu", "ubuntu:24.04", "docker://ubuntu:24.04", "docker://library/ubuntu@sha256:" + "a" * 64,
        "docker://nvcr.io/nvidia/pytorch:24.01-py3", "docker://user@nvcr.io#nvidia/pytorch:24.01",
        "docker://127.0.0.1:5000/ns/img:tag", "docker://[::1]:5000/img", "oci:/tmp/layout:v1",
        "oci-archive:/tmp/img.tar:latest", "docker-archive:/tmp/save.tar", "/tmp/image.sqsh",
        "./image.sif", "../dir/", "docker://localhost/a/b/c:1.0", "docker://UPPER/case",
        "docker://host:notaport/x", "docker://a:b:c", "docker://x@sha256:short", "",
    ]):
        write("reference", f"{i:02}", r)


def mount_specs():
    for i, m in enumerate([
        "/data:/data", "/data:/mnt/data:ro", "/scratch", "/a:/b:rw,/c:/d:ro", "/a:/b:ro:extra",
        "relative:/x", "/a:relative", "/a:/../etc", "/a:/b/../../c", ":/x", "/a:", ",,/a:/b,",
        "/a:/b:rbind", "/etc/passwd:/etc/passwd:ro", "/a:/proc/1",
    ]):
        write("mount_specs", f"{i:02}", m)


def options():
    seeds = [
        (0, "ferry_bin=/usr/bin/ferry cache_dir=/var/cache/ferry cache_max=50G log=debug"),
        (0, "rootfs=unpack kernel_squashfs=yes gpus=auto container_scope=job insecure_registries=127.0.0.1:5000"),
        (0, "named_dir=/tmp host_libs=/usr/lib/x86_64-linux-gnu/libibverbs.so.1 bogus=1"),
        (1, "all"), (1, "none"), (1, "0,1,3"), (1, "GPU-1234abcd,GPU-5678"), (1, "0-3"),
        (2, "50G"), (2, "1.5T"), (2, "100"), (2, "10MiB"), (2, "-1G"), (2, "99999999999999999999T"),
        (3, "PATH=/usr/bin\nexport LANG=C.UTF-8\n# comment\nQUOTED=\"a b\"\nSINGLE='x'\n=bad\n"),
        (4, "srun\0-n2\0--container=img.sqsh\0--\0python\0train.py\0"),
        (4, "srun\0--container\0/tmp/x\0-N\0003\0--mpi=pmix\0./ring\0"),
        (4, "srun\0-Q\0--container-image=docker://ubuntu\0--container-mounts=/a:/b\0true\0"),
        (5, "linux/amd64"), (5, "linux/arm64/v8"), (5, "slurm 22.05.8"), (5, "#define SLURM_VERSION_NUMBER 0x160508"),
    ]
    for i, (which, text) in enumerate(seeds):
        write("options", f"{i:02}", bytes([which]) + text.encode())


def digest(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def manifests():
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/bin", "A=b"], "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["true"],
                   "WorkingDir": "/work", "User": "1000:1000"},
        "rootfs": {"type": "layers", "diff_ids": [digest(b"x")]},
    })
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest(b"l"), "size": 1}
    oci = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                 "digest": digest(config.encode()), "size": len(config)},
                      "layers": [layer, dict(layer, mediaType="application/vnd.oci.image.layer.v1.tar+zstd")]})
    docker = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                         "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                                    "digest": digest(b"c"), "size": 1},
                         "layers": [dict(layer, mediaType="application/vnd.docker.image.rootfs.diff.tar.gzip")]})
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [
                            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest(b"1"),
                             "size": 10, "platform": {"os": "linux", "architecture": "amd64"}},
                            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest(b"2"),
                             "size": 10, "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest(b"3"),
                             "size": 10, "platform": {"os": "unknown", "architecture": "unknown"},
                             "annotations": {"vnd.docker.reference.type": "attestation-manifest"}}]})
    schema1 = json.dumps({"schemaVersion": 1, "name": "x", "fsLayers": []})
    for i, doc in enumerate([oci, docker, index, config, schema1, '{"schemaVersion":2}', "[]", "{"]):
        write("manifest", f"{i:02}", doc)


def layers():
    ok = [
        {"name": "etc/", "type": tarfile.DIRTYPE, "mode": 0o755},
        {"name": "etc/hostname", "data": b"box\n"},
        {"name": "bin/", "type": tarfile.DIRTYPE, "mode": 0o555},
        {"name": "bin/sh", "data": b"#!", "mode": 0o4755},
        {"name": "bin/ln", "type": tarfile.LNKTYPE, "link": "bin/sh"},
        {"name": "lib", "type": tarfile.SYMTYPE, "link": "usr/lib"},
        {"name": "usr/lib/libc.so", "data": b"\x7fELF"},
        {"name": "etc/.wh.hostname"},
        {"name": "var/.wh..wh..opq"},
        {"name": "dev/null", "type": tarfile.CHRTYPE},
        {"name": "fifo", "type": tarfile.FIFOTYPE},
    ]
    hostile = [
        [{"name": "../outside/x", "data": b"escaped"}],
        [{"name": "/abs/x", "data": b"escaped"}],
        [{"name": "a/../../outside/x", "data": b"escaped"}],
        [{"name": "up/x", "data": b"through a lower layer's symlink"}],
        [{"name": "abs/x", "data": b"through an absolute symlink"}],
        [{"name": "s", "type": tarfile.SYMTYPE, "link": "../outside"}, {"name": "s/x", "data": b"escaped"}],
        [{"name": "s", "type": tarfile.SYMTYPE, "link": "/tmp"}, {"name": "s/x", "data": b"escaped"}],
        [{"name": "h", "type": tarfile.LNKTYPE, "link": "../outside/x"}],
        [{"name": "h", "type": tarfile.LNKTYPE, "link": "up/x"}],
        [{"name": "h", "type": tarfile.LNKTYPE, "link": "/etc/passwd"}],
        [{"name": ".wh..."}, {"name": "a/.wh..."}],
        [{"name": ".wh.up"}, {"name": "up/.wh..wh..opq"}],
        [{"name": "big", "data": b"", "size": 0}],
        [{"name": "d/", "type": tarfile.DIRTYPE, "mode": 0o000}, {"name": "d/f", "data": b"x"}],
        [{"name": "f", "data": b"x"}, {"name": "f/g", "data": b"y"}],
    ]
    write("layer", "00-plain", tar_bytes(ok))
    write("layer", "01-gnu", tar_bytes(ok, tarfile.GNU_FORMAT))
    write("layer", "02-gzip", gzip.compress(tar_bytes(ok), mtime=0))
    for i, entries in enumerate(hostile):
        write("layer", f"{i + 10:02}-hostile", tar_bytes(entries))
    write("layer", "30-truncated-gzip", gzip.compress(tar_bytes(ok), mtime=0)[:200])
    write("layer", "31-zstd-magic", b"\x28\xb5\x2f\xfd" + b"\0" * 32)


def sifs(fixtures):
    if fixtures and os.path.isdir(fixtures):
        for name in sorted(os.listdir(fixtures)):
            if name.endswith(".sif"):
                with open(os.path.join(fixtures, name), "rb") as f:
                    data = f.read()
                # The header and descriptors are what is parsed; keep seeds small.
                write("sif", name, data[:65536])
    sb = bytearray(96)
    sb[0:4] = b"hsqs"
    write("sif", "squashfs-superblock", bytes(sb))
    write("sif", "ldcache", b"glibc-ld.so.cache1.1" + b"\0" * 28)


def archives():
    layer = tar_bytes([{"name": "etc/marker", "data": b"docker-archive\n"}])
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["true"]},
                         "rootfs": {"type": "layers", "diff_ids": [digest(layer)]}}).encode()
    cfg_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": cfg_name, "RepoTags": ["img:latest"], "Layers": ["l1/layer.tar"]}]).encode()
    docker = tar_bytes([{"name": "manifest.json", "data": manifest}, {"name": cfg_name, "data": config},
                        {"name": "l1/layer.tar", "data": layer}])
    write("archive", "00-docker-save", docker)
    lying = json.dumps([{"Config": cfg_name, "Layers": ["../../etc/passwd", "missing.tar"]}]).encode()
    write("archive", "01-lying-manifest", tar_bytes([{"name": "manifest.json", "data": lying},
                                                     {"name": cfg_name, "data": config}]))
    mf = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                     "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(config),
                                "size": len(config)},
                     "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(layer),
                                 "size": len(layer)}]}).encode()
    index = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest(mf), "size": len(mf),
         "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}).encode()
    blob = lambda b: "blobs/sha256/" + hashlib.sha256(b).hexdigest()
    oci = tar_bytes([{"name": "oci-layout", "data": b'{"imageLayoutVersion":"1.0.0"}'},
                     {"name": "index.json", "data": index}, {"name": blob(mf), "data": mf},
                     {"name": blob(config), "data": config}, {"name": blob(layer), "data": layer}])
    write("archive", "02-oci-archive", oci)
    write("archive", "03-oci-missing-blob", tar_bytes([{"name": "oci-layout", "data": b'{"imageLayoutVersion":"1.0.0"}'},
                                                       {"name": "index.json", "data": index}]))


def main():
    fixtures = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "../../shared/fixtures/sif")
    references()
    mount_specs()
    options()
    manifests()
    layers()
    sifs(fixtures)
    archives()


if __name__ == "__main__":
    main()
