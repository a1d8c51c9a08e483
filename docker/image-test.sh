#!/usr/bin/env bash
# make image-test: build both images with podman on this machine and check that the steps
# run inside the CPU image (no network, non-root) give what the same steps give outside it.
#
# Needs root (it installs podman, runc and debootstrap with apt-get when they are missing)
# and the project's .venv (make install). No container registry is reachable here, so the
# base image is made from the machine's Debian mirror with debootstrap, and the builds get
# the host's pip configuration mounted read-only so pip reaches the same package sources.
# All state (image store, base rootfs, outputs) lives under IMAGE_TEST_DIR; the base image
# is built once and reused. See docker/README.md for what it checks and how long it takes.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE=${IMAGE_TEST_DIR:-/var/tmp/genreflow-image-test}
VENV=$(realpath "${VENV:-.venv}")
TORCH_INDEX=${TORCH_INDEX-$(sed -n 's/^TORCH_INDEX ?= *//p' Makefile)}
BASE_IMAGE=localhost/base:ci
PY=$VENV/bin/python
GENREFLOW=$VENV/bin/genreflow
RUN=$STATE/run

die() { echo "image-test: $*" >&2; exit 1; }
timings=()
phase() {  # phase LABEL COMMAND...: run one phase, print and remember its wall time
  local label=$1 start=$SECONDS
  shift
  echo
  echo "== $label"
  "$@"
  timings+=("$(printf '%5d s  %s' $((SECONDS - start)) "$label")")
  echo "== $label: $((SECONDS - start)) s"
}

install_tools() {
  local missing=()
  for tool in podman runc debootstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  if ((${#missing[@]})); then
    ((EUID == 0)) || die "${missing[*]} missing; as root: apt-get install -y podman runc debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq podman runc debootstrap >/dev/null
  fi
  ((EUID == 0)) || die "run as root: the builds and runs use rootful podman"
  [[ -x $GENREFLOW ]] || die "$GENREFLOW missing: run make install first"
  podman --version
}

configure_podman() {
  mkdir -p "$STATE"
  # podman's defaults fail here: crun cannot handle this machine's cgroups, and its default
  # ulimits exceed the hard limits. Per-run files, so /etc stays as it is.
  local nofile nproc
  nofile=$(ulimit -Hn)
  nproc=$(ulimit -Hu)
  [[ $nofile == unlimited || $nofile -gt 65536 ]] && nofile=65536
  [[ $nproc == unlimited || $nproc -gt 4096 ]] && nproc=4096
  cat >"$STATE/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
  cat >"$STATE/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$STATE/storage"
runroot = "$STATE/runroot"
CONF
  export CONTAINERS_CONF=$STATE/containers.conf CONTAINERS_STORAGE_CONF=$STATE/storage.conf
}

debian_mirror() {  # the first mirror the apt sources list for SUITE (one-line or deb822 form)
  local suite=$1
  {
    grep -hsE '^\s*deb\s' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
      sed -E 's/^\s*deb\s+(\[[^]]*\]\s+)?//' | awk -v s="$suite" '$2 == s { print $1 }'
    awk -v s="$suite" 'BEGIN { RS = "" }
      { uri = ""; ok = 0
        n = split($0, lines, "\n")
        for (i = 1; i <= n; i++) {
          if (lines[i] ~ /^URIs:/) { split(lines[i], w, /[ \t]+/); uri = w[2] }
          if (lines[i] ~ /^Suites:/) { m = split(lines[i], w, /[ \t]+/); for (j = 2; j <= m; j++) if (w[j] == s) ok = 1 }
          if (lines[i] ~ /^Enabled:[ \t]*no/) ok = -1
        }
        if (ok == 1 && uri != "") print uri }' /etc/apt/sources.list.d/*.sources 2>/dev/null
  } | head -n 1
}

build_base() {
  if podman image exists "$BASE_IMAGE"; then
    echo "$BASE_IMAGE exists: reused (remove $STATE to rebuild it)"
    return
  fi
  local suite mirror rootfs=$STATE/rootfs
  # shellcheck disable=SC1091 # the machine's own file, read at run time
  suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  mirror=$(debian_mirror "$suite")
  mirror=${mirror:-http://deb.debian.org/debian}
  echo "debootstrap $suite from $mirror"
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include=python3-venv,ca-certificates \
    "$suite" "$rootfs" "$mirror" >"$STATE/debootstrap.log" 2>&1 ||
    die "debootstrap failed; see $STATE/debootstrap.log"
  # The machine's own CA certificates (its HTTPS proxy signs with them), then a venv first on
  # PATH: Debian's Python refuses pip outside one (PEP 668), the python:3.11-slim base does not.
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
  fi
  chroot "$rootfs" update-ca-certificates >/dev/null
  chroot "$rootfs" python3 -m venv /opt/venv
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . |
    podman import --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
}

build_images() {
  local flags=(--isolation chroot --network host --pull=never
    --build-arg "BASE=$BASE_IMAGE" --build-arg "LOCK=requirements/runtime.lock"
    -v "$STATE/pip.conf:/etc/pip.conf:ro")
  local kind value host_index="" torch_index
  while read -r kind value; do
    case $kind in
      mount) flags+=(-v "$value:$value:ro") ;;
      index) host_index=$value ;;
    esac
  done < <("$PY" docker/image_check.py pip-config "$STATE/pip.conf")
  # torch from the Makefile's TORCH_INDEX where it answers (the CPU build on any machine),
  # else from the host's own index, as `make install` does: here, local CPU wheels.
  torch_index=$("$PY" docker/torch_index.py "${TORCH_INDEX:-}")
  flags+=(--build-arg "TORCH_INDEX=${torch_index:-$host_index}")
  ENGINE=podman docker/build.sh --out "$STATE/images.json" -- "${flags[@]}"
  cpu_image=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["cpu"]["id"])' "$STATE/images.json")
  gpu_image=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["gpu"]["id"])' "$STATE/images.json")
  podman images --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -v '<none>'
}

in_image() {  # in_image IMAGE COMMAND...: no network, the synthetic set read-only, /out writable
  podman run --rm --network none -v "$RUN/source:/data:ro" -v "$RUN/inside:/out:U" "$@"
}

check_image_basics() {
  local image commit outside
  commit=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["commit"])' "$STATE/images.json")
  outside=$("$GENREFLOW" --version)
  for image in "$cpu_image" "$gpu_image"; do
    [[ $(in_image "$image" genreflow --version) == "$outside" ]] || die "$image: not $outside"
    [[ $(in_image "$image" id -u) == 10001 ]] || die "$image: does not run as uid 10001"
    [[ $(podman image inspect --format '{{index .Labels "org.opencontainers.image.revision"}}' "$image") == "$commit" ]] ||
      die "$image: label org.opencontainers.image.revision is not $commit"
    [[ $(in_image "$image" python -c 'from genreflow.tracking.runs import git_commit; print(git_commit())') == "$commit" ]] ||
      die "$image: genreflow.tracking.runs.git_commit() does not give $commit"
    echo "$image: $outside, uid 10001, commit $commit (label and tracking)"
  done
  # Only the mounted output is writable: not the root, the Python environment, /etc, the input.
  # shellcheck disable=SC2016 # expanded by the container's shell
  in_image "$cpu_image" sh -c '
    status=0
    for dir in / /etc "$(python -c "import sys; print(sys.prefix)")" /data; do
      if touch "$dir/.write-test" 2>/dev/null; then echo "writable: $dir"; status=1; fi
    done
    touch /out/.write-test && rm /out/.write-test || { echo "cannot write /out"; status=1; }
    exit $status' || die "the container can write outside its mounted output"
  echo "uid 10001 cannot write /, /etc, the Python environment or the read-only input; can write /out"
}

make_synthetic_set() {
  rm -rf "$RUN"
  mkdir -p "$RUN/outside" "$RUN/inside"
  "$GENREFLOW" synth --out "$RUN/source" --clips-per-genre 2 --seconds 2 --seed 0
}

steps() {  # steps PREFIX RUNNER...: download, pack and one training fold under PREFIX
  local prefix=$1 root
  shift
  root=$("$@" genreflow download --source "$SOURCE_DIR/genres.tar.gz" --out "$prefix/dataset" | sed -n 1p)
  "$@" genreflow pack --dataset "$root" --out "$prefix/features.h5" --clip-seconds 2 --no-progress
  "$@" genreflow train --features "$prefix/features.h5" --fold 1 --out "$prefix/fold1" \
    --iterations 2 --batch-size 2 --eval-every 1 --no-mixup --device cpu
}

steps_inside() { SOURCE_DIR=/data steps /out in_image "$cpu_image"; }
steps_outside() { SOURCE_DIR=$RUN/source steps "$RUN/outside" env PATH="$VENV/bin:$PATH"; }
compare() { "$PY" docker/image_check.py compare "$RUN/outside" "$RUN/inside"; }
sizes() {
  podman image inspect --format '{{index .RepoTags 0}}  {{.Size}}' "$cpu_image" "$gpu_image" |
    awk '{ printf "%s  %.0f MB\n", $1, $2 / 1e6 }'
}

total_start=$SECONDS
phase "tools" install_tools
configure_podman
phase "base image ($BASE_IMAGE)" build_base
phase "build both images (docker/build.sh, podman)" build_images
phase "synthetic set (outside)" make_synthetic_set
phase "version, user, labels, write protection" check_image_basics
phase "download, pack, train one fold: inside the CPU image" steps_inside
phase "download, pack, train one fold: outside" steps_outside
phase "compare inside and outside" compare
echo
echo "== image sizes"
sizes
echo "== wall time per phase"
printf '%s\n' "${timings[@]}"
echo "== image-test passed in $((SECONDS - total_start)) s"
