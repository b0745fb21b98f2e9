#!/usr/bin/env python3
"""The driver of integration/bench (run it through that script, which prepares the images,
the packages and the cluster). Runs as root; every measured command runs as the test user
in a long-lived executor process that times it itself, so that no `runuser` start is
counted. Root only drops the page cache before cold runs and resets caches.

Subcommands:
  compare   ferry against bare runs and its peers, every workload below; writes results.md,
            results.json and start-vs-size.png (integration/bench, its --smoke in CI)
  run       start of `ferry run IMAGE true` against bare `true` and `unshare -Ur true`, for
            a ~200 MB and a >=2 GB image, runs interleaved (integration/bench run)
  srun      start of `srun -n1|-n2 --container=IMAGE true` against bare srun, same images,
            runs interleaved, on the running cluster (integration/bench srun)
  build     `ferry build` against `ch-image build` and rootless `podman build`, one
            Dockerfile, cold and cached (integration/bench build)
  torch     `python3 -c 'import torch'` in the PyTorch image, warm and cold, every provider
            of `ferry run` and `srun --container`, ch-run and unpacking per job against the
            same tree on the host's disk, rounds interleaved (integration/bench torch)

Workloads of compare:
  start     `true` in each system, for every image size; srun -n1 and -n2; warm (image in
            the page cache, unpacked trees present) and cold (page cache dropped; for the
            unpack provider also its tree removed: first use on the node)
  metadata  Python importing a set of standard modules; `find /usr /etc /var` ten times
  torch     `python3 -c 'import torch'` in the PyTorch image, warm and cold, per provider,
            against the same tree on the host's disk and against unpacking per job
  reads     two processes reading two different 100 MiB files of the 1 GB image at once,
            cold, per root filesystem provider
  footprint disk a job adds on the node, and the memory (RSS) of what ferry keeps running
            during a step
  growth    warm start against image size (the plot)
  build     the `build` subcommand's comparison (in --smoke: ferry alone, a tiny Dockerfile)
"""

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time

USER = "ferrytest"
PYTHON_IMPORTS = (
    "argparse asyncio base64 collections concurrent.futures csv dataclasses datetime decimal "
    "difflib email.mime.text fractions functools gzip hashlib http.client http.server inspect "
    "ipaddress json logging multiprocessing pathlib pickle pprint queue random shutil socket "
    "ssl statistics string subprocess tarfile tempfile textwrap threading typing unittest "
    "urllib.request uuid xml.dom.minidom xml.etree.ElementTree zipfile"
).split()

EXECUTOR = r"""
import json, os, subprocess, sys, time
for line in sys.stdin:
    req = json.loads(line)
    env = dict(os.environ)
    env.update(req.get("env", {}))
    started = time.perf_counter()
    try:
        p = subprocess.run(req["cmd"], env=env, cwd=req.get("cwd", "/tmp"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=req.get("timeout", 900))
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = -1, e.stdout or b"", (e.stderr or b"") + b"\ntimed out"
    except OSError as e:
        rc, out, err = -2, b"", str(e).encode()
    took = time.perf_counter() - started
    print(json.dumps({"s": took, "rc": rc, "out": out.decode(errors="replace")[-4000:],
                      "err": err.decode(errors="replace")[-4000:]}), flush=True)
"""


class Executor:
    """Commands as the test user, timed in that user's own process."""

    def __init__(self, env):
        args = ["runuser", "-u", USER, "--", "env", "-i"]
        args += [f"{k}={v}" for k, v in env.items()]
        args += ["/usr/bin/python3", "-u", "-c", EXECUTOR]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, cmd, env=None, timeout=900):
        self.proc.stdin.write(json.dumps({"cmd": cmd, "env": env or {}, "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def ferry_run(ferry, image, *command, rootfs="squashfuse"):
    """`ferry run` of IMAGE with the root filesystem provider ROOTFS, always named: the
    default (auto) has rows of its own, and the test cluster pins squashfuse."""
    return [ferry, "run", "--rootfs", rootfs, image, *command]


def srun(tasks, *command, image=None, rootfs="squashfuse", overcommit=False):
    """`srun -nTASKS`, with the plugin's --container=IMAGE and --container-rootfs=ROOTFS if
    IMAGE is given."""
    return (["srun"] + (["-O"] if overcommit else []) + [f"-n{tasks}"]
            + ([f"--container-rootfs={rootfs}"] if image else [])
            + ([f"--container={image}"] if image else []) + list(command))


def interleaved(ex, cases, runs):
    """Wall times in ms of each case's command, `runs` rounds over all cases after one
    warm-up run each (page cache, binaries); a failing command ends the benchmark."""
    times = {name: [] for name in cases}
    for round_ in range(runs + 1):  # round 0: the warm-up, not counted
        for name, cmd in cases.items():
            r = ex.run(cmd)
            if r["rc"] != 0:
                reason = (r["err"].strip().splitlines() or r["out"].strip().splitlines() or ["?"])[-1]
                sys.exit(f"bench: `{' '.join(cmd)}` failed (exit {r['rc']}): {reason[:300]}")
            if round_ > 0:
                times[name].append(r["s"] * 1000)
    return times


def start_images(images):
    """The two images of `run` and `srun`: start cost must not grow with the image."""
    return os.path.join(images, "big-200m.sqsh"), os.path.join(images, "big-2g.sqsh")


def user_env(**extra):
    """The test user's minimal environment (`env -i`) for `run` and `srun`."""
    return {"PATH": "/usr/bin:/bin", "HOME": f"/home/{USER}", **extra}


def run_start(args):
    small, big = start_images(args.images)
    cases = {
        "true": ["true"],
        "unshare -Ur true": ["unshare", "-Ur", "true"],
        "ferry run 200MB true": ferry_run(args.ferry, small, "true"),
        "ferry run 2GB true": ferry_run(args.ferry, big, "true"),
    }
    ex = Executor(user_env())
    try:
        times = interleaved(ex, cases, args.runs)
    finally:
        ex.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'command':24} {'median ms':>10} {'min':>7} {'max':>7} {'vs unshare':>11}")
    for name, v in times.items():
        print(f"{name:24} {med[name]:10.2f} {min(v):7.2f} {max(v):7.2f} {med[name]-med['unshare -Ur true']:+10.2f}")
    ratio = med["ferry run 2GB true"] / med["ferry run 200MB true"]
    print(f"\n2GB/200MB start-time ratio: {ratio:.3f} (target <= 1.20); "
          f"ferry 200MB over unshare: {med['ferry run 200MB true']-med['unshare -Ur true']:.2f} ms (target <= 15)")


def srun_start(args):
    small, big = start_images(args.images)
    cases = {}
    for n in (1, 2):
        cases[f"srun -n{n} true"] = srun(n, "true", overcommit=True)
        cases[f"srun -n{n} --container=200MB true"] = srun(n, "true", image=small, overcommit=True)
        cases[f"srun -n{n} --container=2GB true"] = srun(n, "true", image=big, overcommit=True)
    # The default provider (auto) after a node's first start, at the sizes of the full
    # bench's images where they are built (integration/build-images --bench).
    sizes = [(label, os.path.join(args.images, name)) for label, name in
             (("100MB", "big-100m.sqsh"), ("1GB", "big-1g.sqsh"), ("4GB", "big-4g.sqsh"))]
    auto = [(label, path) for label, path in sizes if os.path.exists(path)] or [("200MB", small), ("2GB", big)]
    for label, path in auto:
        cases[f"srun -n1 --container={label} true (auto)"] = srun(1, "true", image=path, rootfs="auto")
    ex = Executor(user_env(SLURM_CONF=args.slurm_conf))
    try:
        for label, path in auto:  # first use: the trees, not timed
            ex.run(srun(1, "true", image=path, rootfs="auto"), timeout=1800)
            wait_for_background_unpacks()
            ex.run(srun(1, "true", image=path, rootfs="auto"), timeout=1800)
        times = interleaved(ex, cases, args.runs)
    finally:
        ex.close()
    runs = args.runs
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{runs} interleaved runs each, ms")
    print(f"| {'command':34} | {'median':>7} | {'min':>7} | {'max':>7} | {'over bare':>9} |")
    print(f"|{'-'*36}|{'-'*9}|{'-'*9}|{'-'*9}|{'-'*11}|")
    for name, v in times.items():
        bare = med[f"srun -n{name.split(' -n')[1][0]} true"]
        print(f"| {name:34} | {med[name]:7.1f} | {min(v):7.1f} | {max(v):7.1f} | {med[name]-bare:+9.1f} |")
    for n in (1, 2):
        s, b = med[f"srun -n{n} --container=200MB true"], med[f"srun -n{n} --container=2GB true"]
        print(f"-n{n}: 2GB/200MB ratio {b/s:.3f}; over bare srun: 200MB {s-med[f'srun -n{n} true']:.1f} ms, "
              f"2GB {b-med[f'srun -n{n} true']:.1f} ms (target <= 20 ms, same for both sizes)")
    over = {label: med[f"srun -n1 --container={label} true (auto)"] - med["srun -n1 true"] for label, _ in auto}
    print("default provider (auto), over bare srun -n1: "
          + ", ".join(f"{label} {v:+.1f} ms" for label, v in over.items())
          + f" (target <= 5 ms: {'met' if all(v <= 5 for v in over.values()) else 'not met'})")


# The Dockerfile of the build comparison; {base} is each builder's own form of one Debian
# tree. apt reaches the network as the test user here; RUN steps share the host's network.
BUILD_DOCKERFILE = """\
FROM {base}
RUN apt-get update && apt-get install -y --no-install-recommends python3-numpy && rm -rf /var/lib/apt/lists/*
ENV PYTHONUNBUFFERED=1
WORKDIR /opt/app
COPY app/ /opt/app/
CMD ["python3", "/opt/app/analyse.py"]
"""
# --smoke: ferry alone, on busybox, a RUN that writes files instead of apt.
BUILD_DOCKERFILE_SMOKE = """\
FROM {base}
RUN mkdir -p /opt/data && i=0 && while [ $i -lt 200 ]; do echo $i > /opt/data/f$i; i=$((i+1)); done
ENV APP_MODE=smoke
WORKDIR /opt/app
COPY app/ /opt/app/
CMD ["cat", "/opt/app/analyse.py"]
"""
ANALYSE_PY = "import numpy\nprint(numpy.arange(10).sum())\n"


class BuildBench:
    """One Dockerfile built by each builder as the test user, cold (the builder's cache and
    storage emptied first, its base imported again outside the timing) and cached (the
    unchanged rebuild right after), rounds interleaved over the builders."""

    def __init__(self, ex, scratch, images, ferry, runs, smoke, ch_image=None, podman=("podman",)):
        self.ex, self.runs, self.smoke, self.ferry = ex, runs, smoke, ferry
        self.dir = os.path.join(scratch, "build")
        self.ch_image = ch_image
        self.results, self.unavailable, self.notes = [], {}, []
        name = "busybox" if smoke else "debian"
        self.base_sqsh = os.path.join(images, f"{name}.sqsh")
        if not os.path.exists(self.base_sqsh):
            sys.exit(f"bench: image {self.base_sqsh} is missing: run integration/build-images")
        self.context = os.path.join(self.dir, "context")
        self.store = {k: os.path.join(self.dir, k) for k in ("ferry-cache", "ch-storage", "podman-root",
                                                             "podman-run", "tree")}
        self.podman = list(podman) + ["--root", self.store["podman-root"], "--runroot", self.store["podman-run"],
                                      "--storage-driver", "overlay", "--runtime=runc",
                                      "--cgroup-manager=cgroupfs"]
        os.makedirs(os.path.join(self.context, "app"), exist_ok=True)
        with open(os.path.join(self.context, "app", "analyse.py"), "w") as f:
            f.write(ANALYSE_PY)
        for i in range(20):  # a small context: a few files of a few KiB
            with open(os.path.join(self.context, "app", f"data{i}.txt"), "w") as f:
                f.write(f"{i}\n" * 1000)
        template = BUILD_DOCKERFILE_SMOKE if smoke else BUILD_DOCKERFILE
        for system, base in (("ferry", self.base_sqsh), ("ch-image", "ferry-bench-base"),
                             ("podman", "localhost/ferry-bench-base")):
            with open(os.path.join(self.context, f"Dockerfile.{system}"), "w") as f:
                f.write(template.format(base=base))
        subprocess.run(["chown", "-R", f"{USER}:{USER}", self.dir], check=True)

    # ch-image's build cache is a git repository: git wants an identity, which the test
    # user's home does not give.
    ENV = {f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")
           for what, value in (("NAME", "ferry bench"), ("EMAIL", "bench@localhost"))}

    def user(self, cmd, what, timeout=1800):
        """A preparation step as the test user (not timed); its last error line, or None."""
        r = self.ex.run(cmd, env=self.ENV, timeout=timeout)
        if r["rc"] != 0:
            lines = (r["err"] + r["out"]).strip().splitlines() or ["?"]
            return f"{what}: exit {r['rc']}: {lines[-1][:200]}"
        return None

    def builders(self):
        """(system, build command, reset) of each builder that runs here; the others go to
        self.unavailable with the reason."""
        ctx, out = self.context, self.dir
        ferry = ("ferry build", [self.ferry, "build", "--cache", self.store["ferry-cache"], "-f",
                                 os.path.join(ctx, "Dockerfile.ferry"), "-t", os.path.join(out, "ferry.sqsh"),
                                 ctx], self.reset_ferry)
        if self.smoke:
            for system in ("ch-image build", "podman build (rootless)"):
                self.unavailable[system] = "not run in --smoke mode"
            return [ferry]
        systems = [ferry]
        # The peers build from the same Debian tree, unpacked once and given to the test user
        # (every file readable to the imports); its /dev emptied, as in registry images,
        # since the user cannot copy device nodes.
        tree = self.store["tree"]
        subprocess.run(["unsquashfs", "-q", "-n", "-d", tree, self.base_sqsh], check=True,
                       stdout=subprocess.DEVNULL)
        for entry in os.listdir(os.path.join(tree, "dev")):
            path = os.path.join(tree, "dev", entry)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        subprocess.run(["chown", "-R", f"{USER}:{USER}", tree], check=True)
        if not self.ch_image:
            self.unavailable["ch-image build"] = "no ch-image (Debian's charliecloud-builders)"
        else:
            # --force: without it apt-get fails in ch-image's single-uid container; with it,
            # ch-image 0.31 installs pseudo (fakeroot) into the image and wraps each RUN.
            ch = [self.ch_image, "-s", self.store["ch-storage"]]
            systems.append(("ch-image build", ch + ["build", "--force", "-t", "ferry-bench-build", "-f",
                                                    os.path.join(ctx, "Dockerfile.ch-image"), ctx],
                            self.reset_ch_image))
        systems.append(("podman build (rootless)", self.podman + [
            "build", "--network=host", "-t", "localhost/ferry-bench-build", "-f",
            os.path.join(ctx, "Dockerfile.podman"), ctx], self.reset_podman))
        # A builder that cannot even take the base is listed with the reason.
        runnable = []
        for system, cmd, reset in systems:
            why = reset()
            if why:
                self.unavailable[system] = why
            else:
                runnable.append((system, cmd, reset))
        return runnable

    def reset_ferry(self):
        shutil.rmtree(self.store["ferry-cache"], ignore_errors=True)
        return None

    def reset_ch_image(self):
        shutil.rmtree(self.store["ch-storage"], ignore_errors=True)
        return self.user([self.ch_image, "-s", self.store["ch-storage"], "import", self.store["tree"],
                          "ferry-bench-base"], "ch-image import")

    def reset_podman(self):
        # The store holds files of the user's subordinate ids: podman removes it.
        for d in ("podman-root", "podman-run"):
            if os.path.exists(self.store[d]):
                why = self.user(self.podman + ["system", "reset", "-f"], "podman system reset")
                if why:
                    return why
                break
        return self.user(["bash", "-o", "pipefail", "-c",
                          f"tar -C {self.store['tree']} -c . | {' '.join(self.podman)} import -q - "
                          f"localhost/ferry-bench-base"], "podman import")

    def run(self):
        systems = self.builders()
        samples = {(system, mode): [] for system, _, _ in systems for mode in ("cold", "cached")}
        failed = set()
        for round_ in range(self.runs):
            for system, cmd, reset in systems:
                if system in failed:
                    continue
                if round_ > 0:  # round 0 starts from the reset done above
                    why = reset()
                    if why:
                        self.unavailable[system] = why
                        failed.add(system)
                        continue
                for mode in ("cold", "cached"):
                    r = self.ex.run(cmd, env=self.ENV, timeout=1800)
                    if r["rc"] != 0:
                        reason = (r["err"].strip().splitlines() or r["out"].strip().splitlines() or ["?"])[-1]
                        self.unavailable[system] = f"{mode} build: exit {r['rc']}: {reason[:200]}"
                        failed.add(system)
                        break
                    samples[(system, mode)].append(r["s"])
                    print(f"  build     {system:28} {mode:6} {r['s']:8.2f} s", flush=True)
        for (system, mode), v in samples.items():
            if system in failed or not v:
                continue
            self.results.append({"workload": "build", "system": system, "image": "debian" if not self.smoke
                                 else "busybox", "mode": mode, "n": len(v), "median": statistics.median(v),
                                 "min": min(v), "max": max(v), "unit": "s"})
        self.check_image()
        return self.results

    def check_image(self):
        """Each built image runs its CMD's script (not timed): a build that is fast but wrong
        is no result, and its row goes."""
        inner = ["cat", "/opt/app/analyse.py"] if self.smoke else ["python3", "/opt/app/analyse.py"]
        want = "import numpy" if self.smoke else "45"
        runs = {
            "ferry build": ferry_run(self.ferry, os.path.join(self.dir, "ferry.sqsh"), "--", *inner),
            "ch-image build": ["ch-run", os.path.join(self.store["ch-storage"], "img", "ferry-bench-build"),
                               "--", *inner],
            "podman build (rootless)": self.podman + ["run", "--rm", "--network=host",
                                                      "localhost/ferry-bench-build", *inner],
        }
        for system in {r["system"] for r in self.results}:
            r = self.ex.run(runs[system], env=self.ENV)
            if r["rc"] != 0 or want not in r["out"]:
                self.unavailable[system] = (f"its image does not run `{' '.join(inner)}`: exit {r['rc']}: "
                                            f"{(r['err'] + r['out']).strip()[-200:]}")
                self.results = [x for x in self.results if x["system"] != system]

    def row(self, system, mode):
        return next((r for r in self.results if (r["system"], r["mode"]) == (system, mode)), None)

    def table(self):
        """Markdown lines: seconds and the ratio to ferry, cold and cached."""
        lines = ["| builder | cold s (median) | min | max | x ferry | cached s (median) | min | max | x ferry |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        systems = []
        for r in self.results:
            if r["system"] not in systems:
                systems.append(r["system"])
        for system in systems:
            cells = []
            for mode in ("cold", "cached"):
                r, f = self.row(system, mode), self.row("ferry build", mode)
                if r:
                    ratio = f"{r['median'] / f['median']:.2f}" if f and f["median"] else ""
                    cells.append(f"{r['median']:.2f} | {r['min']:.2f} | {r['max']:.2f} | {ratio}")
                else:
                    cells.append(" | | | ")
            lines.append(f"| {system} | " + " | ".join(cells) + " |")
        return lines

    def targets(self):
        out = []
        cached = self.row("ferry build", "cached")
        if cached:
            out.append(("cached rebuild of an unchanged Dockerfile < 1 s (ferry build)",
                        f"{cached['median']:.2f} s", cached["median"] < 1.0))
        cold = self.row("ferry build", "cold")
        peers = [r for r in self.results if r["mode"] == "cold" and r["system"] != "ferry build"]
        if cold and peers:
            fastest = min(peers, key=lambda r: r["median"])
            out.append(("cold build no slower than the fastest peer",
                        f"ferry {cold['median']:.1f} s, {fastest['system']} {fastest['median']:.1f} s",
                        cold["median"] <= fastest["median"]))
        return out


def build_compare(args):
    """integration/bench build: the table, the targets and what could not run."""
    ex = Executor(user_env(USER=USER, XDG_RUNTIME_DIR=os.path.join(args.scratch, "user", "run")))
    load = os.getloadavg()
    try:
        b = BuildBench(ex, args.scratch, args.images, args.ferry, args.runs, smoke=False,
                       ch_image=args.ch_image)
        b.run()
    finally:
        ex.close()
    load_after = os.getloadavg()
    print(f"\n{args.runs} runs each, as the test user; cold: the builder's cache emptied and its base "
          f"imported again (not timed); cached: the unchanged rebuild right after")
    print("\n".join(b.table()))
    for t, m, ok in b.targets():
        print(f"target: {t}: {m} ({'met' if ok else 'not met'})")
    for k, v in sorted(b.unavailable.items()):
        print(f"not measured: {k}: {v}")
    for n in b.notes:
        print(f"note: {n}")
    print(f"load average (1/5/15 min) before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; {os.cpu_count()} cores")


def torch_import(args):
    """integration/bench torch: `python3 -c 'import torch'` in the PyTorch image, warm and
    cold, every system in each round (the order rotated between rounds), as the test user.
    Bare is the same tree on the host's disk, run by the image's own python in a chroot in a
    user namespace (the host has no torch); srun rows compare against the bare command
    through srun. "Unpack per job" unpacks the image into a fresh directory and runs there,
    as enroot does for each container: warm only, a few runs."""
    image, tree, f = args.image, args.tree, args.ferry
    inner = ["python3", "-c", "import torch"]
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"  # not in the user's PATH
    bare = ["unshare", "-Ur", chroot, tree] + inner
    per_job_dir = os.path.join(args.scratch, "user")
    # The user cannot make the image's device nodes (unsquashfs says so for each and, with
    # -no-exit-code, fails only on fatal errors): the host's /dev is bound in, as enroot does.
    per_job = sh(f"d=$(mktemp -d -p {per_job_dir}) && unsquashfs -no-exit-code -q -n -d $d/r {image} "
                 f">/dev/null 2>&1 && unshare -Urm /bin/sh -c \"mount --rbind /dev $d/r/dev && "
                 f"exec {chroot} $d/r python3 -c 'import torch'\"; rc=$?; rm -rf $d; exit $rc")
    bare_name = "bare (unpacked tree on the host's disk)"
    systems = [
        (bare_name, bare),
        ("ferry run (squashfuse)", ferry_run(f, image, "--", *inner)),
        ("ferry run (unpack)", ferry_run(f, image, "--", *inner, rootfs="unpack")),
        (AUTO_RUN, ferry_run(f, image, "--", *inner, rootfs="auto")),
        ("ch-run (squashfs)", ["ch-run", image, "--"] + inner),
        ("unpack per job (enroot's way)", per_job),
        ("srun bare", srun(1, *bare)),
        ("srun --container (squashfuse)", srun(1, *inner, image=image)),
        ("srun --container (unpack)", srun(1, *inner, image=image, rootfs="unpack")),
        ("srun --container (kernel)", srun(1, *inner, image=image, rootfs="kernel")),
        (AUTO_SRUN, srun(1, *inner, image=image, rootfs="auto")),
    ]
    if args.only:
        systems = [(s, c) for s, c in systems if re.search(args.only, s)]
    cache = os.path.join(args.scratch, "user", "cache")
    os.makedirs(cache, exist_ok=True)
    shutil.chown(cache, USER, USER)
    ex = Executor(user_env(SLURM_CONF=args.slurm_conf, FERRY_CACHE=cache, USER=USER))
    load = os.getloadavg()
    unavailable, notes = {}, []
    key = torch_unpack_key(image)
    plugin_tree = os.path.join(f"/tmp/ferry-{pwd_uid(USER)}", "unpacked", key)
    plugin_tree_existed = os.path.isdir(plugin_tree)

    def why(r):
        lines = (r["err"] + r["out"]).strip().splitlines() or ["?"]
        return f"exit {r['rc']}: {lines[-1][:200]}"

    try:
        # First use: the unpack providers' trees (and every binary) made before any timing.
        for system, cmd in systems:
            if "per job" in system:
                continue
            r = ex.run(cmd, timeout=1800)
            wait_for_background_unpacks()
            if r["rc"] != 0:
                unavailable[system] = why(r)
            elif "(unpack)" in system:
                notes.append(f"first use of {system} (tree unpacked, not timed below): {r['s']:.1f} s")
            print(f"  first use {system:40} {r['s']:7.2f} s{'' if r['rc'] == 0 else '  ' + unavailable[system]}",
                  flush=True)
        runnable = [(s, c) for s, c in systems if s not in unavailable]
        samples = {(s, m): [] for s, _ in runnable for m in ("warm", "cold")}
        for mode in ("warm", "cold"):
            if mode == "warm":
                for system, cmd in runnable:  # the page cache filled for every system
                    if "per job" not in system:
                        ex.run(cmd)
            for round_ in range(args.runs):
                k = round_ % len(runnable)
                for system, cmd in runnable[k:] + runnable[:k]:
                    if "per job" in system and (mode == "cold" or round_ >= args.per_job_runs):
                        continue
                    if "per job" in system and shutil.disk_usage(per_job_dir).free < args.min_free_gb * 2**30:
                        # Other users of the disk come first: this run is left out, said so.
                        notes.append(f"{system}: round {round_ + 1} left out, less than "
                                     f"{args.min_free_gb} GiB free on {per_job_dir}")
                        continue
                    if mode == "cold":
                        drop_caches()
                    r = ex.run(cmd, timeout=1800)
                    if r["rc"] != 0:
                        unavailable[system] = f"{mode} run: {why(r)}"
                        continue
                    samples[(system, mode)].append(r["s"])
                    print(f"  {mode} {round_ + 1}/{args.runs} {system:40} {r['s']:7.2f} s", flush=True)
    finally:
        ex.close()
        # The plugin's tree is left as found (the test user's, shared by its jobs on the node).
        if not plugin_tree_existed:
            shutil.rmtree(plugin_tree, ignore_errors=True)
    load_after = os.getloadavg()

    rows = []
    for (system, mode), v in samples.items():
        if not v or system in unavailable:
            if not v and mode == "warm" and system not in unavailable:
                unavailable[system] = "no run (see the notes)"
            continue
        q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0], v[0], v[0]]
        rows.append({"system": system, "mode": mode, "n": len(v), "median": statistics.median(v),
                     "p25": q[0], "p75": q[2], "min": min(v), "max": max(v), "samples": v})

    def row(system, mode):
        return next((r for r in rows if (r["system"], r["mode"]) == (system, mode)), None)

    def bare_of(r):
        return row("srun bare" if r["system"].startswith("srun") else bare_name, r["mode"])

    lines = [f"`python3 -c 'import torch'`, {os.path.basename(image)} ({os.path.getsize(image) / 1e9:.2f} GB, "
             f"{squashfs_compression(image)}), {args.runs} rounds, systems interleaved; as {USER}; seconds",
             f"warm: the page cache filled by a run of each system first; cold: `sync; echo 3 > "
             f"/proc/sys/vm/drop_caches` before each run",
             f"bare: {' '.join(bare)}", "",
             "| system | mode | median | p25 | p75 | min | max | n | x bare |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in ("warm", "cold"):
        for r in (r for r in rows if r["mode"] == mode):
            b = bare_of(r)
            ratio = f"{r['median'] / b['median']:.2f}" if b else ""
            lines.append(f"| {r['system']} | {mode} | {r['median']:.2f} | {r['p25']:.2f} | {r['p75']:.2f} | "
                         f"{r['min']:.2f} | {r['max']:.2f} | {r['n']} | {ratio} |")
    targets = []
    for system, mode, limit in ((AUTO_RUN, "warm", 1.10), (AUTO_RUN, "cold", 1.5),
                                (AUTO_SRUN, "warm", 1.10), (AUTO_SRUN, "cold", 1.5)):
        r = row(system, mode)
        b = r and bare_of(r)
        if r and b:
            ratio = r["median"] / b["median"]
            targets.append({"target": f"{mode} {system} within {limit:.2f}x of {b['system']}",
                            "measured": f"{ratio:.2f}x", "met": ratio <= limit})
    lines.append("")
    lines += [f"target: {t['target']}: {t['measured']} ({'met' if t['met'] else 'not met'})" for t in targets]
    lines += [f"not measured: {k}: {v}" for k, v in sorted(unavailable.items())]
    lines += [f"note: {n}" for n in notes]
    lines.append(f"load average (1/5/15 min) before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; after: "
                 f"{load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; {os.cpu_count()} cores; "
                 f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("\n" + "\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "torch.md"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
        with open(os.path.join(args.out, "torch.json"), "w") as fh:
            json.dump({"image": image, "tree": tree, "runs": args.runs, "load_before": load,
                       "load_after": load_after, "rows": rows, "targets": targets,
                       "unavailable": unavailable, "notes": notes}, fh, indent=1)
        print(f"bench: results in {args.out}/ (torch.md, torch.json)")


# The default provider's rows: `auto` named, as the test cluster pins squashfuse.
AUTO_RUN = "ferry run (auto, the default)"
AUTO_SRUN = "srun --container (auto, the default)"
AUTO_SRUN_N1 = "srun -n1 --container (auto, the default)"


def wait_for_background_unpacks(limit=1800):
    """Until the test user's background unpacks (the `auto` provider's first use) are done:
    the default's rows measure the node's starts after its first."""
    end = time.time() + limit
    while time.time() < end:
        r = subprocess.run(["pgrep", "-u", USER, "-f", "unpack-in-backgroun[d]"], stdout=subprocess.DEVNULL)
        if r.returncode != 0:
            return
        time.sleep(0.5)


def torch_unpack_key(image):
    """The name of an image's shared unpacked tree (launcher/src/rootfs/unpacked.rs,
    unpack_key): the image file's identity."""
    st = os.stat(image)
    return f"{st.st_dev:x}-{st.st_ino:x}-{st.st_size:x}-{int(st.st_mtime):x}.{st.st_mtime_ns % 10**9}"


def pwd_uid(user):
    import pwd
    return pwd.getpwnam(user).pw_uid


def squashfs_compression(image):
    r = subprocess.run(["unsquashfs", "-s", image], capture_output=True, text=True)
    return next((l.split()[1] for l in r.stdout.splitlines() if l.startswith("Compression ")), "?")


def drop_caches():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def sh(script):
    return ["/bin/sh", "-c", script]


class Bench:
    def __init__(self, args):
        self.args = args
        self.runs = args.runs
        self.smoke = args.smoke
        self.scratch = args.scratch
        self.user_dir = os.path.join(args.scratch, "user")
        self.cache = os.path.join(self.user_dir, "cache")
        self.ferry = args.ferry
        self.results = []
        self.unavailable = {}
        self.notes = []
        uid = int(subprocess.run(["id", "-u", USER], capture_output=True, text=True).stdout)
        self.uid = uid
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": f"/home/{USER}",
            "USER": USER,
            "SLURM_CONF": args.slurm_conf,
            "FERRY_CACHE": self.cache,
            "XDG_RUNTIME_DIR": os.path.join(self.user_dir, "run"),
        }
        os.makedirs(env["XDG_RUNTIME_DIR"], exist_ok=True)
        os.makedirs(self.cache, exist_ok=True)
        shutil.chown(env["XDG_RUNTIME_DIR"], USER, USER)
        shutil.chown(self.cache, USER, USER)
        os.chmod(env["XDG_RUNTIME_DIR"], 0o700)
        self.ex = Executor(env)
        # podman's own storage, kept between runs like the unpacked trees, with the overlay
        # driver (its default here was vfs, which copies the whole image per container).
        store = os.path.join(os.path.dirname(args.out.rstrip("/")), ".bench-podman")
        os.makedirs(store, exist_ok=True)
        shutil.chown(store, USER, USER)
        self.podman = ["podman", "--root", store, "--runroot", os.path.join(self.user_dir, "podman-run"),
                       "--storage-driver", "overlay", "--runtime=runc", "--cgroup-manager=cgroupfs"]
        self.images = self.pick_images()
        self.build_bench = None

    # ---- images and trees -------------------------------------------------------------

    def pick_images(self):
        d = self.args.images
        if self.smoke:
            sizes = [("busybox", "busybox.sqsh")]
        else:
            sizes = [("100 MB", "big-100m.sqsh"), ("1 GB", "big-1g.sqsh"), ("4 GB", "big-4g.sqsh")]
        images = []
        for label, name in sizes:
            path = os.path.join(d, name)
            if not os.path.exists(path):
                sys.exit(f"bench: image {path} is missing: run integration/build-images --bench")
            images.append({"label": label, "sqsh": path, "mb": os.path.getsize(path) / 1e6,
                           "tree": self.tree_of(path)})
        return images

    def tree_of(self, sqsh):
        """The image unpacked once (for the systems that run directories), kept between runs."""
        base = os.path.join(os.path.dirname(self.args.out.rstrip("/")), ".bench-trees")
        tree = os.path.join(base, os.path.basename(sqsh) + ".d")
        stamp = tree + ".stamp"
        mtime = str(os.path.getmtime(sqsh))
        if not (os.path.isdir(tree) and os.path.exists(stamp) and open(stamp).read() == mtime):
            shutil.rmtree(tree, ignore_errors=True)
            os.makedirs(base, exist_ok=True)
            os.chmod(base, 0o755)
            subprocess.run(["unsquashfs", "-q", "-n", "-d", tree, sqsh], check=True,
                           stdout=subprocess.DEVNULL)
            with open(stamp, "w") as f:
                f.write(mtime)
        return tree

    # ---- measuring --------------------------------------------------------------------

    def measure(self, workload, system, image, mode, cmd, reset=None, env=None, runs=None,
                unit="ms", value=None, check=None):
        """Run `cmd` `runs` times (cold: page cache dropped and `reset` called before each)."""
        runs = runs or self.runs
        samples = []
        for _ in range(runs):
            if reset:
                reset()
            if mode == "cold":
                drop_caches()
            r = self.ex.run(cmd, env=env)
            if r["rc"] != 0 or (check and not check(r["out"])):
                reason = (r["err"].strip().splitlines() or r["out"].strip().splitlines() or ["?"])[-1]
                self.unavailable[f"{system} ({workload})"] = f"exit {r['rc']}: {reason[:200]}"
                return None
            samples.append(value(r) if value else r["s"] * (1000 if unit == "ms" else 1))
        row = {"workload": workload, "system": system, "image": image, "mode": mode,
               "n": len(samples), "median": statistics.median(samples), "min": min(samples),
               "max": max(samples), "unit": unit}
        self.results.append(row)
        print(f"  {workload:9} {system:34} {image:8} {mode:5} {row['median']:10.2f} {unit}", flush=True)
        return row

    def available(self, system, probe):
        r = self.ex.run(probe, timeout=300)
        if r["rc"] != 0:
            lines = (r["err"] + r["out"]).strip().splitlines() or ["?"]
            self.unavailable[system] = f"exit {r['rc']}: {lines[-1][:200]}"
            return False
        return True

    def reset_unpacked(self):
        # ferry run --rootfs unpack keeps its trees in the user's cache; the plugin's in
        # named_dir (/tmp by default).
        for d in (os.path.join(self.cache, f"unpacked-{self.uid}"), f"/tmp/ferry-{self.uid}/unpacked"):
            shutil.rmtree(d, ignore_errors=True)

    # ---- systems ----------------------------------------------------------------------

    def start_systems(self, img):
        f, s, t = self.ferry, img["sqsh"], img["tree"]
        systems = [
            ("bare `true`", ["true"], None),
            ("ferry run (squashfuse)", ferry_run(f, s, "true"), None),
            ("ferry run (unpack)", ferry_run(f, s, "true", rootfs="unpack"), self.reset_unpacked),
            # The default, after a node's first start of the image (that one is squashfuse's).
            (AUTO_RUN, ferry_run(f, s, "true", rootfs="auto"), None),
            ("bubblewrap (unpacked dir)", ["bwrap", "--unshare-user", "--ro-bind", t, "/", "--proc", "/proc",
                                           "--dev", "/dev", "true"], None),
            ("unsquashfs per job", sh(f"d=$(mktemp -d -p {self.user_dir}) && unsquashfs -q -n -f -d $d/r {s} "
                                     f"&& rm -rf $d"), None),
        ]
        if not self.smoke:
            systems += [
                ("ch-run (unpacked dir)", ["ch-run", t, "--", "true"], None),
                ("ch-run (squashfs)", ["ch-run", s, "--", "true"], None),
                # crun refuses this machine's v1/v2 hybrid cgroups; Debian's runc runs.
                ("podman run", self.podman + ["run", "--rm", "--network=host", self.podman_name(img), "true"],
                 None),
            ]
        return systems

    def srun_systems(self, img):
        s = img["sqsh"]
        return [
            ("srun -n1", srun(1, "true"), None),
            ("srun -n1 --container (squashfuse)", srun(1, "true", image=s), None),
            ("srun -n1 --container (unpack)", srun(1, "true", image=s, rootfs="unpack"), self.reset_unpacked),
            ("srun -n1 --container (kernel)", srun(1, "true", image=s, rootfs="kernel"), None),
            (AUTO_SRUN_N1, srun(1, "true", image=s, rootfs="auto"), None),
            ("srun -n2", srun(2, "true", overcommit=True), None),
            ("srun -n2 --container (squashfuse)", srun(2, "true", image=s, overcommit=True), None),
        ]

    def podman_name(self, img):
        return "localhost/ferry-bench/" + os.path.basename(img["sqsh"]).replace(".", "-")

    def prepare_peers(self):
        if self.smoke:
            for system in ("ch-run (unpacked dir)", "ch-run (squashfs)", "podman run"):
                self.unavailable[system] = "not run in --smoke mode"
            return
        for img in self.images:
            name = self.podman_name(img)
            if self.ex.run(self.podman + ["image", "exists", name])["rc"] != 0:
                podman = " ".join(self.podman)
                r = self.ex.run(["bash", "-o", "pipefail", "-c",
                                 f"tar -C {img['tree']} -c . | {podman} import -q - {name}"], timeout=1800)
                if r["rc"] != 0:
                    self.notes.append(f"podman import of {img['label']} failed: {r['err'].strip()[-200:]}")

    # ---- workloads --------------------------------------------------------------------

    def start(self):
        print("start: `true`", flush=True)
        self.prepare_peers()
        for img in self.images:
            for mode in ("warm", "cold"):
                systems = [s for s in self.start_systems(img) + self.srun_systems(img)
                           if s[0] not in self.unavailable]
                if mode == "warm":
                    for system, cmd, _ in systems:
                        self.ex.run(cmd)  # first use: unpack, page cache
                    wait_for_background_unpacks()
                    self.measure_interleaved("start", systems, img["label"], mode)
                    continue
                # Cold runs of the unpack rows remove the trees first, the default's too: they
                # come after the others, one system at a time.
                self.measure_interleaved("start", [s for s in systems if not s[2]], img["label"], mode)
                for system, cmd, reset in (s for s in systems if s[2]):
                    self.measure("start", system, img["label"], mode, cmd, reset=reset)

    def measure_interleaved(self, workload, systems, image, mode):
        """[`measure`] of several systems in rounds, one run of each per round: a drift of the
        machine (another tenant, the page cache, a timer) then weighs on all of them alike,
        which the comparisons against bare need. The order rotates between rounds."""
        if not systems:
            return
        samples = {system: [] for system, _, _ in systems}
        failed = set()
        for round_ in range(self.runs):
            k = round_ % len(systems)
            for system, cmd, _ in systems[k:] + systems[:k]:
                if system in failed:
                    continue
                if mode == "cold":
                    drop_caches()
                r = self.ex.run(cmd)
                if r["rc"] != 0:
                    reason = (r["err"].strip().splitlines() or r["out"].strip().splitlines() or ["?"])[-1]
                    self.unavailable[f"{system} ({workload})"] = f"exit {r['rc']}: {reason[:200]}"
                    failed.add(system)
                    continue
                samples[system].append(r["s"] * 1000)
        for system, _, _ in systems:
            v = samples[system]
            if system in failed or not v:
                continue
            row = {"workload": workload, "system": system, "image": image, "mode": mode, "n": len(v),
                   "median": statistics.median(v), "min": min(v), "max": max(v), "unit": "ms"}
            self.results.append(row)
            print(f"  {workload:9} {system:34} {image:8} {mode:5} {row['median']:10.2f} ms", flush=True)

    def metadata(self):
        print("metadata", flush=True)
        py = os.path.join(self.args.images, "python.sqsh")
        debian = os.path.join(self.args.images, "debian.sqsh")
        image = py if os.path.exists(py) else debian
        label = "python" if image == py else "debian"
        tree = self.tree_of(image)
        f = self.ferry
        imports = "import " + ", ".join(PYTHON_IMPORTS)
        # The image's own directories: `/ -xdev` would also walk the host's /tmp and home,
        # bound in from the same file system as an unpacked tree.
        # Ten walks, so that the walk, not the container's start, is what is measured.
        find = "for i in 1 2 3 4 5 6 7 8 9 10; do find /usr /etc /var; done | wc -l"
        cases = [("find x10", sh(find), None)]
        if image == py:
            cases.insert(0, ("python imports", ["python3", "-c", imports], None))
        else:
            self.unavailable["python imports"] = "no python.sqsh (integration/build-images --bench)"
        for name, inner, _ in cases:
            host = ["python3", "-c", imports] if name == "python imports" else sh(f"for i in 1 2 3 4 5 6 7 8 9 10; do find {tree}/usr {tree}/etc {tree}/var; done | wc -l")
            systems = [
                ("bare (host, unpacked tree)", host),
                ("ferry run (squashfuse)", ferry_run(f, image, "--", *inner)),
                ("ferry run (unpack)", ferry_run(f, image, "--", *inner, rootfs="unpack")),
                ("srun --container (squashfuse)", srun(1, *inner, image=image)),
                ("srun --container (unpack)", srun(1, *inner, image=image, rootfs="unpack")),
                ("srun --container (kernel)", srun(1, *inner, image=image, rootfs="kernel")),
                ("srun bare", srun(1, *host)),
                ("bubblewrap (unpacked dir)", ["bwrap", "--unshare-user", "--ro-bind", tree, "/", "--proc",
                                               "/proc", "--dev", "/dev"] + inner),
            ]
            if not self.smoke:
                systems.append(("ch-run (unpacked dir)", ["ch-run", tree, "--"] + inner))
            for system, cmd in systems:
                if system in self.unavailable:
                    continue
                self.ex.run(cmd)
                self.measure("metadata", f"{system}", f"{label}: {name}", "warm", cmd)

    def torch(self):
        """`python3 -c 'import torch'` in the PyTorch image: thousands of files opened, the
        start of every PyTorch job. Bare is the same tree on the host's disk (chroot in a
        user namespace); "unpack per job" unpacks the image into a fresh directory first, as
        enroot does for each container."""
        print("torch", flush=True)
        image = os.path.join(self.args.images, "pytorch.sqsh")
        if self.smoke or not os.path.exists(image):
            self.unavailable["import torch"] = ("not run in --smoke mode (3 GB image)" if self.smoke
                                                else "no pytorch.sqsh (integration/build-images --pytorch)")
            return
        tree = self.tree_of(image)
        f = self.ferry
        inner = ["python3", "-c", "import torch"]
        bare = ["unshare", "-Ur", "chroot", tree] + inner
        per_job = sh(f"d=$(mktemp -d /var/tmp/bench-torch.XXXXXX) && unsquashfs -q -n -d $d/r {image} "
                     f">/dev/null; unshare -Ur chroot $d/r python3 -c 'import torch'; rc=$?; rm -rf $d; exit $rc")
        systems = [
            ("bare (host, unpacked tree)", bare, None),
            ("ferry run (squashfuse)", ferry_run(f, image, "--", *inner), None),
            ("ferry run (unpack)", ferry_run(f, image, "--", *inner, rootfs="unpack"), self.reset_unpacked),
            ("srun bare", srun(1, *bare), None),
            ("srun --container (squashfuse)", srun(1, *inner, image=image), None),
            ("srun --container (unpack)", srun(1, *inner, image=image, rootfs="unpack"), self.reset_unpacked),
            ("srun --container (kernel)", srun(1, *inner, image=image, rootfs="kernel"), None),
            (AUTO_RUN, ferry_run(f, image, "--", *inner, rootfs="auto"), None),
            (AUTO_SRUN, srun(1, *inner, image=image, rootfs="auto"), None),
            ("unpack per job (enroot's way)", per_job, None),
        ]
        runs = max(3, self.runs // 3)
        for mode in ("warm", "cold"):
            for system, cmd, reset in systems:
                if system in self.unavailable or (mode == "warm" and "per job" in system):
                    continue
                if mode == "warm":
                    self.ex.run(cmd)
                    wait_for_background_unpacks()
                self.measure("torch", system, "pytorch", mode, cmd,
                             reset=reset if mode == "cold" else None, runs=runs)

    def reads(self):
        print("reads", flush=True)
        if self.smoke:
            self.unavailable["parallel reads"] = "not run in --smoke mode (needs the 1 GB image)"
            return
        img = next(i for i in self.images if i["label"] == "1 GB")
        f, s, t = self.ferry, img["sqsh"], img["tree"]
        two = ("cat {r}/data/blob1 > /dev/null & a=$!; cat {r}/data/blob2 > /dev/null & b=$!; "
               "wait $a && wait $b")
        mib = 200.0
        systems = [
            ("bare (host, unpacked tree)", sh(two.format(r=t))),
            ("srun bare", srun(1, *sh(two.format(r=t)))),
            ("ferry run (squashfuse)", ferry_run(f, s, "--", *sh(two.format(r="")))),
            ("ferry run (unpack)", ferry_run(f, s, "--", *sh(two.format(r="")), rootfs="unpack")),
            ("srun --container (squashfuse)", srun(1, *sh(two.format(r="")), image=s)),
            ("srun --container (unpack)", srun(1, *sh(two.format(r="")), image=s, rootfs="unpack")),
            ("srun --container (kernel)", srun(1, *sh(two.format(r="")), image=s, rootfs="kernel")),
        ]
        for system, cmd in systems:
            self.ex.run(cmd)
            self.measure("reads", system, img["label"], "cold", cmd, unit="MiB/s",
                         value=lambda r: mib / r["s"])

    def build(self):
        """`ferry build` against its peers (BuildBench); fewer runs than the other workloads,
        since a cold build with apt takes a minute."""
        print("build", flush=True)
        self.build_bench = BuildBench(self.ex, self.scratch, self.args.images, self.ferry,
                                      2 if self.smoke else min(self.runs, 3), self.smoke,
                                      ch_image=self.args.ch_image, podman=self.podman[:1])
        self.results += self.build_bench.run()
        for system, why in self.build_bench.unavailable.items():
            self.unavailable[f"{system} (build)"] = why
        self.notes += self.build_bench.notes

    def user_bytes(self):
        total = 0
        for d in (self.user_dir, f"/tmp/ferry-{self.uid}", f"/var/tmp/{USER}.ch",
                  f"/home/{USER}/.local/share/containers"):
            r = subprocess.run(["du", "-sb", d], capture_output=True, text=True)
            if r.returncode == 0:
                total += int(r.stdout.split()[0])
        return total

    def footprint(self):
        print("footprint", flush=True)
        img = self.images[0]
        f, s = self.ferry, img["sqsh"]
        # Disk: what one job leaves or needs on the node (first job, then a later one).
        jobs = [
            ("ferry run (squashfuse)", ferry_run(f, s, "true"), None),
            ("srun --container (squashfuse)", srun(1, "true", image=s), None),
            ("ferry run (unpack)", ferry_run(f, s, "true", rootfs="unpack"), self.reset_unpacked),
            ("unsquashfs per job", sh(f"d=$(mktemp -d -p {self.user_dir}) && unsquashfs -q -n -f -d $d/r {s} "
                                     f"&& du -sb $d | cut -f1 && rm -rf $d"), None),
        ]
        for system, cmd, reset in jobs:
            if reset:
                reset()
            before = self.user_bytes()
            r = self.ex.run(cmd)
            first = self.user_bytes() - before
            r2 = self.ex.run(cmd)
            later = self.user_bytes() - before - first
            if system == "unsquashfs per job" and r2["rc"] == 0:
                later = int(r2["out"].split()[-1])  # the tree each job unpacks and removes
            self.results.append({"workload": "footprint", "system": system, "image": img["label"],
                                 "mode": "disk", "first_job_bytes": max(first, 0),
                                 "per_job_bytes": max(later, 0), "n": 1, "unit": "bytes",
                                 "median": max(later, 0), "min": max(later, 0), "max": max(later, 0)})
        # Memory: RSS of ferry's processes (holder, squashfuse) while a step runs.
        for system, cmd in [
            ("srun --container (squashfuse)", srun(1, "sleep", "3", image=s)),
            ("ferry run (squashfuse)", ferry_run(f, s, "sleep", "3")),
        ]:
            proc = subprocess.Popen(["runuser", "-u", USER, "--", "env", f"SLURM_CONF={self.args.slurm_conf}",
                                     f"FERRY_CACHE={self.cache}"] + cmd,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/tmp")
            time.sleep(1.5)
            rss = self.ferry_rss(include_cli=system.startswith("ferry run"))
            proc.wait()
            self.results.append({"workload": "footprint", "system": system, "image": img["label"],
                                 "mode": "memory", "n": 1, "unit": "KiB", "median": rss, "min": rss,
                                 "max": rss})
        print("  footprint done", flush=True)

    def ferry_rss(self, include_cli):
        total = 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                status = open(f"/proc/{pid}/status").read()
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            except OSError:
                continue
            uid = next((l.split()[1] for l in status.splitlines() if l.startswith("Uid:")), None)
            if uid != str(self.uid):
                continue
            ours = " hold" in cmd or "squashfuse" in cmd or (include_cli and cmd.startswith(self.ferry + " run"))
            if ours:
                rss = next((int(l.split()[1]) for l in status.splitlines() if l.startswith("VmRSS:")), 0)
                total += rss
        return total

    # ---- report -----------------------------------------------------------------------

    def row(self, workload, system, image, mode):
        for r in self.results:
            if (r["workload"], r["system"], r["image"], r["mode"]) == (workload, system, image, mode):
                return r
        return None

    def bare_for(self, r):
        if r["workload"] == "start":
            bare = "srun -n2" if "-n2" in r["system"] else "srun -n1" if r["system"].startswith("srun") \
                else "bare `true`"
            return self.row("start", bare, r["image"], r["mode"])
        if r["workload"] == "metadata":
            bare = "srun bare" if r["system"].startswith("srun") else "bare (host, unpacked tree)"
            return self.row("metadata", bare, r["image"], r["mode"])
        if r["workload"] in ("reads", "torch"):
            bare = "srun bare" if r["system"].startswith("srun") else "bare (host, unpacked tree)"
            return self.row(r["workload"], bare, r["image"], r["mode"])
        return None

    def targets(self):
        out = []
        warm = []
        for img in self.images:
            c = self.row("start", "srun -n1 --container (squashfuse)", img["label"], "warm")
            b = self.row("start", "srun -n1", img["label"], "warm")
            if c and b:
                warm.append((img["label"], c["median"] - b["median"]))
        if warm:
            worst = max(v for _, v in warm)
            out.append(("warm start <= 20 ms over bare srun for every image size",
                        ", ".join(f"{l}: {v:+.1f} ms" for l, v in warm), worst <= 20))
        # Issue 20, point 5, with the default provider.
        over = []
        for img in self.images:
            c = self.row("start", AUTO_SRUN_N1, img["label"], "warm")
            b = self.row("start", "srun -n1", img["label"], "warm")
            if c and b:
                over.append((img["label"], c["median"] - b["median"]))
        if over:
            out.append(("warm `srun --container` <= 5 ms over bare srun with the default provider",
                        ", ".join(f"{l}: {v:+.1f} ms" for l, v in over), max(v for _, v in over) <= 5))
        peer = []
        for img in self.images:
            c = self.row("start", AUTO_RUN, img["label"], "warm")
            p = self.row("start", "ch-run (squashfs)", img["label"], "warm")
            if c and p:
                peer.append((img["label"], c["median"], p["median"]))
        if peer:
            out.append(("warm `ferry run` <= `ch-run` on the same squashfs with the default provider",
                        ", ".join(f"{l}: {c:.1f} vs {p:.1f} ms" for l, c, p in peer),
                        all(c <= p for _, c, p in peer)))
        cold = [self.row("start", "srun -n1 --container (squashfuse)", i["label"], "cold") for i in self.images]
        cold = [c for c in cold if c]
        if len(cold) >= 2:
            ratio = cold[-1]["median"] / cold[0]["median"]
            out.append(("cold start of a squashfs image independent of its size",
                        f"{cold[-1]['image']}/{cold[0]['image']}: {ratio:.2f}x "
                        f"({cold[0]['median']:.1f} vs {cold[-1]['median']:.1f} ms)", ratio <= 1.2))
        meta = []
        for r in self.results:
            if r["workload"] == "metadata" and r["system"] in ("ferry run (unpack)", "srun --container (unpack)"):
                b = self.bare_for(r)
                if b:
                    launcher = "srun" if r["system"].startswith("srun") else "ferry run"
                    meta.append((f"{r['image']} ({launcher})", r["median"] / b["median"]))
        if meta:
            out.append(("metadata-heavy work within 10% of bare with the unpack provider",
                        ", ".join(f"{i}: {v:.2f}x" for i, v in meta), all(v <= 1.10 for _, v in meta)))
        for mode, limit in (("warm", 1.10), ("cold", 1.5)):
            rows = [r for r in self.results if r["workload"] == "torch" and r["mode"] == mode
                    and r["system"] in (AUTO_RUN, AUTO_SRUN)]
            ratios = [(r["system"], r["median"] / b["median"]) for r in rows if (b := self.bare_for(r))]
            if ratios:
                out.append((f"{mode} `import torch` within {limit:.2f}x of bare with the default provider",
                            ", ".join(f"{sy}: {v:.2f}x" for sy, v in ratios), all(v <= limit for _, v in ratios)))
        disk = [r for r in self.results if r["workload"] == "footprint" and r["mode"] == "disk"
                and "squashfuse" in r["system"]]
        if disk:
            out.append(("no per-job disk for read-only squashfs runs",
                        ", ".join(f"{r['system']}: {r['per_job_bytes']} B" for r in disk),
                        all(r["per_job_bytes"] == 0 and r["first_job_bytes"] == 0 for r in disk)))
        if self.build_bench:
            out += self.build_bench.targets()
        return out

    def write(self):
        out = self.args.out
        machine = {"cpus": os.cpu_count(), "kernel": platform.release(),
                   "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "smoke": self.smoke,
                   "runs": self.runs}
        targets = self.targets()
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump({"machine": machine, "images": [{k: v for k, v in i.items() if k != "tree"}
                                                      for i in self.images],
                       "results": self.results, "unavailable": self.unavailable, "notes": self.notes,
                       "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in targets]},
                      f, indent=1)
        lines = [f"# ferry benchmark, {machine['date']}", "",
                 f"{machine['cpus']} cores, {machine['memory_gib']} GiB, kernel {machine['kernel']}; "
                 f"median of {self.runs} runs unless n says otherwise; as the unprivileged test user."
                 + (" **Smoke run** (tiny image, not for numbers)." if self.smoke else ""), "",
                 "## Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {'yes' if ok else 'no'} |" for t, m, ok in targets]
        titles = {"start": "Start: `true`", "metadata": "Metadata-heavy work",
                  "reads": "Two parallel reads of 100 MiB files (cold)",
                  "torch": "`python3 -c 'import torch'` (PyTorch 2.15 from PyPI, 3 GB squashfs)"}
        for wl in ("start", "metadata", "torch", "reads"):
            rows = [r for r in self.results if r["workload"] == wl]
            if not rows:
                continue
            lines += ["", f"## {titles[wl]}", "",
                      "| system | image | mode | median | min | max | n | vs bare | x bare |",
                      "|---|---|---|---:|---:|---:|---:|---:|---:|"]
            for r in rows:
                b = self.bare_for(r)
                unit = r["unit"]
                over = f"{r['median'] - b['median']:+.1f}" if b and b is not r else ""
                ratio = f"{r['median'] / b['median']:.2f}" if b and b is not r and b["median"] else ""
                lines.append(f"| {r['system']} | {r['image']} | {r['mode']} | {r['median']:.2f} {unit} | "
                             f"{r['min']:.2f} | {r['max']:.2f} | {r['n']} | {over} | {ratio} |")
        if self.build_bench and self.build_bench.results:
            bb = self.build_bench
            lines += ["", f"## Building an image: one Dockerfile, cold and cached (median of {bb.runs})", "",
                      "Cold: the builder's cache and storage emptied, its base imported again (not timed); "
                      "cached: the unchanged rebuild right after."
                      + (" Smoke: ferry alone, busybox, a RUN that writes 200 files." if self.smoke else
                         " `RUN apt-get install python3-numpy` from the network, COPY, ENV, WORKDIR, CMD."),
                      ""] + bb.table()
        fp = [r for r in self.results if r["workload"] == "footprint"]
        if fp:
            lines += ["", "## Footprint", "", "| system | what | first job | each later job |", "|---|---|---:|---:|"]
            for r in fp:
                if r["mode"] == "disk":
                    lines.append(f"| {r['system']} | disk on the node | {r['first_job_bytes'] / 1e6:.1f} MB | "
                                 f"{r['per_job_bytes'] / 1e6:.1f} MB |")
                else:
                    lines.append(f"| {r['system']} | RSS of ferry's processes during the step | "
                                 f"{r['median'] / 1024:.1f} MiB | |")
        if self.unavailable:
            lines += ["", "## Not measured here", "", "| system | why |", "|---|---|"]
            lines += [f"| {k} | {v.replace('|', '/')} |" for k, v in sorted(self.unavailable.items())]
        for n in self.notes:
            lines += ["", f"Note: {n}"]
        lines += ["", "![start time against image size](start-vs-size.png)", ""]
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write("\n".join(lines))
        self.plot()
        print("\n".join(lines))
        print(f"\nbench: results in {out}/ (results.md, results.json, start-vs-size.png)")

    def plot(self):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), dpi=100, sharey=True)
        systems = []
        for r in self.results:
            if r["workload"] == "start" and r["system"] not in systems:
                systems.append(r["system"])
        colours = plt.get_cmap("tab20")
        for ax, mode in zip(axes, ("warm", "cold")):
            for i, system in enumerate(systems):
                pts = []
                for img in self.images:
                    r = self.row("start", system, img["label"], mode)
                    if r:
                        pts.append((img["mb"], r["median"]))
                if not pts:
                    continue
                ours = "ferry" in system or "--container" in system
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if ours else "s",
                        linestyle="-" if ours else "--", linewidth=2 if ours else 1.2,
                        color=colours(i % 20), label=system)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("image size (MB, squashfs)")
            ax.set_title(f"{mode} start of `true`" + (" (smoke run)" if self.smoke else ""))
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel("median of the runs (ms)")
        handles, labels = axes[1].get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=8, loc="center right")
        fig.tight_layout(rect=(0, 0, 0.75, 1))
        fig.savefig(os.path.join(self.args.out, "start-vs-size.png"))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="every workload, every system; results.md/.json/.png")
    c.add_argument("--runs", type=int, default=10)
    c.add_argument("--out", required=True)
    c.add_argument("--scratch", required=True)
    c.add_argument("--images", required=True)
    c.add_argument("--ferry", required=True)
    c.add_argument("--slurm-conf", required=True)
    c.add_argument("--smoke", action="store_true")
    c.add_argument("--ch-image", help="ch-image to compare `ferry build` with (Debian's charliecloud-builders)")
    r = sub.add_parser("run", help="start of `ferry run` against bare `true` and `unshare -Ur true`")
    r.add_argument("--runs", type=int, default=30)
    r.add_argument("--images", required=True)
    r.add_argument("--ferry", required=True)
    s = sub.add_parser("srun", help="start of `srun --container` against bare srun")
    s.add_argument("--runs", type=int, default=25)
    s.add_argument("--images", required=True)
    s.add_argument("--slurm-conf", required=True)
    bu = sub.add_parser("build", help="`ferry build` against `ch-image build` and rootless `podman build`")
    bu.add_argument("--runs", type=int, default=3)
    bu.add_argument("--scratch", required=True)
    bu.add_argument("--images", required=True)
    bu.add_argument("--ferry", required=True)
    bu.add_argument("--ch-image", help="Debian's ch-image (charliecloud-builders)")
    t = sub.add_parser("torch", help="`import torch` per system, warm and cold, against bare")
    t.add_argument("--runs", type=int, default=3)
    t.add_argument("--per-job-runs", type=int, default=3)
    t.add_argument("--min-free-gb", type=int, default=12,
                   help="free GiB needed on the scratch file system to unpack per job")
    t.add_argument("--image", required=True)
    t.add_argument("--tree", required=True)
    t.add_argument("--scratch", required=True)
    t.add_argument("--ferry", required=True)
    t.add_argument("--slurm-conf", required=True)
    t.add_argument("--out")
    t.add_argument("--only", help="a regular expression: only the systems whose names match it")
    args = p.parse_args()
    if args.command == "torch":
        return torch_import(args)
    if args.command == "build":
        return build_compare(args)
    if args.command == "run":
        return run_start(args)
    if args.command == "srun":
        return srun_start(args)
    compare(args)


def compare(args):
    b = Bench(args)
    started = time.time()
    # FERRY_BENCH_GROUPS=start,torch: only those row groups (the rest are listed as not run).
    groups = [g for g in os.environ.get("FERRY_BENCH_GROUPS", "").split(",") if g]
    try:
        for name in ("start", "metadata", "torch", "reads", "footprint", "build"):
            if groups and name not in groups:
                b.unavailable[f"{name} (group)"] = "not run: FERRY_BENCH_GROUPS"
                continue
            getattr(b, name)()
    finally:
        b.ex.close()
    b.write()
    print(f"bench: {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
