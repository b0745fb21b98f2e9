# shellcheck shell=bash
# Shell helpers the integration scripts share; not a command. A script sources it first,
# relative to its own location:  . "$(dirname "$0")/lib.sh"
# It sets `repo` (the checkout's root) and `script_name` (the prefix of the script's error
# lines, its file name; a script that wants more, e.g. slurm-stage's suite, sets it after).

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
script_name=$(basename "$0")

# One error line, prefixed with the script's name; exit 1.
die() {
  echo "$script_name: $*" >&2
  exit 1
}

# For scripts that start daemons, install packages or make device nodes. MESSAGE says why
# (default: "must run as root").
need_root() {
  [ "$(id -u)" -eq 0 ] || die "${1:-must run as root}"
}

# The usage text is the script's own header comment, lines FIRST to LAST; exit 2.
usage_from_header() {
  sed -n "$1,$2s/^# \{0,1\}//p" "$0" >&2
  exit 2
}

# Whether PID is a live process (not a zombie). Not kill -0: a user (`cluster status`) may
# not signal root's daemons.
pid_alive() {
  [ -n "$1" ] && [ -d "/proc/$1" ] && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null
}

# The Debian packages among PACKAGE... that are not installed, one a line.
missing_packages() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}

# The release build's binary and plugin under PREFIX (bin/ferry, lib/spank_ferry.so), for
# scripts that need no `make install` (its config files).
install_release_build() {
  install -d -m 0755 "$1/bin" "$1/lib"
  install -m 0755 "$repo/target/release/ferry" "$1/bin/ferry"
  install -m 0755 "$repo/target/release/libspank_ferry.so" "$1/lib/spank_ferry.so"
}

# The three-node cluster of the MPI tests (tests/mpi.rs) and integration/bench-mpi: three
# slurmds in network namespaces, with their own directory, ports and node names.
multi_cluster() {
  FERRY_CLUSTER_DIR=${FERRY_MULTI_CLUSTER_DIR:-/var/tmp/ferry-mpi-cluster} FERRY_CLUSTER_NODES=3 \
    FERRY_CLUSTER_NODE=fmpi FERRY_SLURMCTLD_PORT=16837 FERRY_SLURMD_PORT=16838 \
    "$repo/integration/cluster" "$@"
}
