#!/usr/bin/env bash
# Build and tag the CPU and CUDA images with docker or podman, whichever works here, and write
# what was built (tags, image ids, digests) to a JSON file that `genreflow compile` can use.
#
#   docker/build.sh [--out FILE] [--push] [-- EXTRA BUILD FLAGS...]
#
# Tags: the references the components use (components/images.py: <registry>/genreflow:<version>
# and <registry>/genreflow-cuda:<version>) and the same repositories tagged with the commit.
# --push pushes every tag and records the registry's digest, the reference to compile with.
# ENGINE=docker|podman picks the tool; IMAGE_REGISTRY=host/org replaces the registry part.
# TORCH_INDEX (make images passes the Makefile's; unset: read from the Makefile) is where the
# CPU image's torch comes from; empty: pip's own index.
set -euo pipefail
cd "$(dirname "$0")/.."

out=workspace/images.json
push=0
extra=()
while (($#)); do
  case $1 in
    --out) out=$2; shift 2 ;;
    --push) push=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "build.sh: unknown argument $1 (see the comment at the top)" >&2; exit 2 ;;
  esac
done

die() { echo "build.sh: $*" >&2; exit 1; }

# The CPU image's torch index: set in one place, the Makefile (TORCH_INDEX ?= ...).
if [[ -z ${TORCH_INDEX+set} ]]; then
  TORCH_INDEX=$(sed -n 's/^TORCH_INDEX ?= *//p' Makefile)
fi

if [[ -z ${ENGINE:-} ]]; then
  # A docker client without a running daemon is common (it is the case here): ask the daemon.
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    ENGINE=docker
  elif command -v podman >/dev/null; then
    ENGINE=podman
  else
    die "neither a working docker (client and daemon) nor podman found; install one"
  fi
fi

# The image references live in one place, components/images.py; read them from there.
# genreflow/__init__.py has no dependencies, so any Python 3 reads them without an install.
mapfile -t refs < <(python3 - <<'PY'
import runpy, sys
sys.path.insert(0, ".")
names = runpy.run_path("components/images.py")
from genreflow import __version__
print(__version__, names["CPU_IMAGE"], names["GPU_IMAGE"], sep="\n")
PY
)
version=${refs[0]}
cpu_image=${refs[1]}
gpu_image=${refs[2]}
if [[ -n ${IMAGE_REGISTRY:-} ]]; then
  cpu_image=$IMAGE_REGISTRY/${cpu_image##*/}
  gpu_image=$IMAGE_REGISTRY/${gpu_image##*/}
fi

commit=$(git rev-parse HEAD 2>/dev/null) || die "not a git checkout: the images are labelled with the commit"
commit_tag=${commit:0:12}
if [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then
  echo "build.sh: warning: uncommitted changes; the commit tag says -dirty" >&2
  commit_tag+=-dirty
fi
# A clone made with a token (https://user:TOKEN@host/..., CI's usual way) keeps it in the origin
# URL; the label is public, so drop anything between the scheme and an @ before the host.
strip_credentials() {
  sed -E 's#^([A-Za-z][A-Za-z0-9+.-]*://)[^/]*@#\1#' <<<"$1"
}
source_url=$(git remote get-url origin 2>/dev/null || true)
source_url=$(strip_credentials "${source_url:-https://github.com/genreflow/genreflow}")

mkdir -p "$(dirname "$out")"
records=$(mktemp -d)
trap 'rm -rf "$records"' EXIT

build() {  # build KIND DOCKERFILE IMAGE [BUILD FLAGS...]
  local kind=$1 dockerfile=$2 image=$3 repo=${3%:*}
  shift 3
  local tags=("$image" "$repo:$commit_tag")
  local start=$SECONDS
  echo "== $kind: $ENGINE build -f $dockerfile (${tags[*]})"
  # The commit's metadata also as flags, applied to the image itself: podman 4.3 (buildah)
  # reuses a cached LABEL or ENV step when only the build argument in it changed, so an
  # image of a new commit kept the old commit's revision label and GENREFLOW_GIT_COMMIT.
  local metadata=(--label "org.opencontainers.image.version=$version"
    --label "org.opencontainers.image.revision=$commit"
    --label "org.opencontainers.image.source=$source_url")
  [[ $ENGINE == podman ]] && metadata+=(--env "GENREFLOW_GIT_COMMIT=$commit")
  # The extra flags come last: a --build-arg there wins over the same one before it.
  "$ENGINE" build -f "$dockerfile" \
    --build-arg VERSION="$version" --build-arg GIT_COMMIT="$commit" \
    --build-arg SOURCE="$source_url" "${metadata[@]}" "$@" \
    "${tags[@]/#/--tag=}" --iidfile "$records/$kind.id" "${extra[@]}" .
  local digest=""
  if ((push)); then
    for tag in "${tags[@]}"; do
      if [[ $ENGINE == podman ]]; then
        podman push --digestfile "$records/$kind.digest" "$tag"
      else
        docker push "$tag"
      fi
    done
    if [[ $ENGINE == podman ]]; then
      digest=$(cat "$records/$kind.digest")
    else
      digest=$(docker image inspect --format '{{index .RepoDigests 0}}' "$image")
      digest=${digest#*@}
    fi
  elif [[ $ENGINE == podman ]]; then
    # The manifest digest of the local image; a registry may recompress on push, so only
    # a pushed digest (--push) is the one to run on a cluster.
    digest=$(podman image inspect --format '{{.Digest}}' "$image")
  fi
  printf '%s\n' "$image" "$repo:$commit_tag" >"$records/$kind.tags"
  echo "$digest" >"$records/$kind.digest"
  echo "== $kind: built in $((SECONDS - start)) s: $(cat "$records/$kind.id")${digest:+ digest $digest}"
}

build cpu docker/Dockerfile.cpu "$cpu_image" --build-arg TORCH_INDEX="$TORCH_INDEX"
build gpu docker/Dockerfile.cuda "$gpu_image"

python3 - "$records" "$out" "$ENGINE" "$version" "$commit" "$push" <<'PY'
import json, pathlib, sys
records, out, engine, version, commit, pushed = sys.argv[1:]
pushed = pushed == "1"
result = {"engine": engine, "version": version, "commit": commit, "pushed": pushed}
for kind in ("cpu", "gpu"):
    folder = pathlib.Path(records)
    tags = folder.joinpath(f"{kind}.tags").read_text().split()
    digest = folder.joinpath(f"{kind}.digest").read_text().strip() or None
    repo = tags[0].rsplit(":", 1)[0]
    result[kind] = {
        "tags": tags,
        "id": folder.joinpath(f"{kind}.id").read_text().strip(),
        "digest": digest,
        # What to compile with: the pushed digest, else the commit tag (local use only).
        "ref": f"{repo}@{digest}" if pushed and digest else tags[1],
    }
pathlib.Path(out).write_text(json.dumps(result, indent=2) + "\n")
print(f"wrote {out}")
print(f"compile with: genreflow compile --image-cpu {result['cpu']['ref']} "
      f"--image-gpu {result['gpu']['ref']}")
PY
