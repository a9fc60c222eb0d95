#!/usr/bin/env bash
# Create .venv (if missing) and install llama3 into it (editable), saying what it installs.
#   bash scripts/setup.sh [--cpu|--cuda]          runtime only
#   bash scripts/setup.sh [--cpu|--cuda] demo     plus Meta's llama-models wheel, for its tokenizer.model
#   bash scripts/setup.sh [--cpu|--cuda] test     plus the test oracles: transformers, llama-models
# torch==$TORCH_VERSION (default 2.13.0). Which build: --cpu or --cuda; by default the CUDA build
# where an NVIDIA GPU is found (nvidia-smi or /proc/driver/nvidia), else the CPU build (a few
# hundred MB, from PyTorch's CPU index when it can be reached, else from your package index).
# TORCH_INDEX_URL=... takes torch from that index instead. The build, its size and where it comes
# from are printed before anything is downloaded. A torch already in .venv is kept when it is the
# build asked for; --cpu / --cuda replace one of the other build. Then: source .venv/bin/activate
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
CPU_INDEX=https://download.pytorch.org/whl/cpu
want="" extra=""
for arg in "$@"; do
    case "$arg" in
        --cpu) want=cpu ;;
        --cuda) want=cuda ;;
        demo|test) extra=$arg ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup.sh: unknown argument '$arg' (use: [--cpu|--cuda] [demo|test])" >&2; exit 2 ;;
    esac
done
if [ -n "$want" ]; then
    build=$want why="--$want"
elif command -v nvidia-smi >/dev/null 2>&1 || [ -e /proc/driver/nvidia ]; then
    build=cuda why="an NVIDIA GPU driver was found"
else
    build=cpu why="no NVIDIA GPU here (no nvidia-smi, no /proc/driver/nvidia)"
fi
[ -x .venv/bin/python ] || { echo "setup: creating .venv with $("$PYTHON" --version)"; "$PYTHON" -m venv .venv; }
. .venv/bin/activate
pip install -q --upgrade pip

# The build of an installed torch, from its metadata (importing torch takes seconds): the CUDA
# build depends on nvidia-* packages (Linux) or says +cuXXX in its version.
torch_build() {
    python - <<'PY' 2>/dev/null
import importlib.metadata as md
v = md.version("torch")
cuda = "+cu" in v or any(r.startswith("nvidia-") for r in (md.requires("torch") or []))
print(v, "cuda" if cuda else "cpu")
PY
}
describe() { [ "$1" = cuda ] && echo "the CUDA build" || echo "the CPU build"; }

install_torch=1 switch_from=""
if have=$(torch_build); then
    have_version=${have% *} have_build=${have#* }
    if [ "$have_build" = "$build" ]; then
        echo "setup: torch $have_version ($(describe "$have_build")) is already in .venv: kept"
        install_torch=0
    elif [ -z "$want" ]; then
        echo "setup: torch $have_version in .venv is $(describe "$have_build"), but $why: kept."
        echo "       To switch: bash scripts/setup.sh --$build${extra:+ $extra}   (replaces it)"
        install_torch=0
    else
        switch_from="torch $have_version in .venv is $(describe "$have_build"); $why asks for $(describe "$build")"
    fi
fi

if [ "$install_torch" = 1 ]; then
    index_args=()
    if [ -n "$TORCH_INDEX_URL" ]; then
        index_args=(--index-url "$TORCH_INDEX_URL")
        echo "setup: torch from TORCH_INDEX_URL=$TORCH_INDEX_URL"
    elif [ "$build" = cpu ]; then
        # PyPI's Linux x86_64 wheel is the CUDA build (GBs of nvidia-* libraries): PyTorch's CPU
        # index has the CPU one. Where that index cannot be reached (a firewall, a local mirror),
        # the package index's torch is used and the plan below says which build it is.
        if python -c "import urllib.request as u; u.urlopen('$CPU_INDEX/torch/', timeout=5)" 2>/dev/null; then
            index_args=(--index-url "$CPU_INDEX")
            echo "setup: the CPU build of torch ($why), from $CPU_INDEX"
        else
            echo "setup: $CPU_INDEX cannot be reached (5 s timeout): looking for torch on your package index"
        fi
    fi
    # What pip would install, and how large, before anything is downloaded or removed.
    plan=$(mktemp)
    trap 'rm -f "$plan" "$plan.log"' EXIT
    # pip reads the wheels' metadata; where an index does not serve it apart, pip downloads the
    # wheel itself (into its cache, so the install below reuses it): that is shown, not hidden.
    set +e +o pipefail
    pip install --dry-run --ignore-installed --report "$plan" "torch==$TORCH_VERSION" "${index_args[@]}" 2>&1 \
        | tee "$plan.log" | { grep -E '^ *Downloading (torch|nvidia)[^ ]*\.whl' | sed 's/^ */setup: (to read its metadata) /'; true; }
    status=${PIPESTATUS[0]}
    set -e -o pipefail
    [ "$status" = 0 ] || { cat "$plan.log" >&2; echo "setup: pip found no torch==$TORCH_VERSION it can install (its messages are above)" >&2; exit 1; }
    plan_build=$(python - "$plan" <<'PY'
import importlib.metadata as md, json, os, sys, urllib.parse, urllib.request

items = json.load(open(sys.argv[1]))["install"]

def size(url):
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        return os.path.getsize(urllib.request.url2pathname(parts.path)), True
    try:
        req = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(r.headers.get("Content-Length") or 0) or None, False
    except Exception:
        return None, False

def mb(n):
    return "? MB" if n is None else (f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB")

def installed(item):
    try:
        return md.version(item["metadata"]["name"]) == item["metadata"]["version"]
    except md.PackageNotFoundError:
        return False

torch = next(i for i in items if i["metadata"]["name"].lower() == "torch")
version = torch["metadata"]["version"]
requires = torch["metadata"].get("requires_dist") or []
cuda = "+cu" in version or any(r.startswith("nvidia-") for r in requires)
url = torch["download_info"]["url"]
n, local = size(url)
where = f"the local file {urllib.request.url2pathname(urllib.parse.urlsplit(url).path)} (no download)" if local \
    else f"to download from {urllib.parse.urlsplit(url).netloc}"
print(f"setup: torch {version} is {'the CUDA' if cuda else 'the CPU'} build: {mb(n)}, {where}", file=sys.stderr)
rest = [i for i in items if i is not torch and not installed(i)]
if rest:
    sizes = [size(i["download_info"]["url"]) for i in rest]
    fetch = [s for s, is_local in sizes if not is_local]
    total = None if any(s is None for s in fetch) else sum(fetch)
    nv = [i for i in rest if i["metadata"]["name"].lower().startswith("nvidia-")]
    note = f", {len(nv)} of them nvidia-* CUDA libraries" if nv else ""
    print(f"       plus {len(rest)} dependencies{note}: {mb(total)} to download", file=sys.stderr)
print("cuda" if cuda else "cpu")
PY
)
    if [ "$plan_build" != "$build" ]; then
        if [ "$build" = cuda ]; then
            echo "setup: your package index offers only the CPU build of torch==$TORCH_VERSION: nothing changed." >&2
            echo "       For the CUDA build name PyTorch's index for your CUDA version, e.g." >&2
            echo "       TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 bash scripts/setup.sh --cuda $extra" >&2
            exit 1
        fi
        if [ -n "$switch_from" ]; then
            echo "setup: $switch_from, but $CPU_INDEX cannot be reached and your package index" >&2
            echo "       offers the CUDA build: nothing changed. Name a CPU index: TORCH_INDEX_URL=... --cpu" >&2
            exit 1
        fi
        echo "setup: NOTE: that is the CUDA build, though $why; it works on CPU but takes GBs. When"
        echo "       $CPU_INDEX can be reached, bash scripts/setup.sh --cpu${extra:+ $extra} replaces it."
    fi
    if [ -n "$switch_from" ]; then
        removed=$(pip list --format=freeze 2>/dev/null | sed 's/==.*//' | grep -E '^(torch|triton|nvidia-.*)$' | tr '\n' ' ')
        echo "setup: $switch_from:"
        echo "       uninstalling $removed"
        # shellcheck disable=SC2086
        pip uninstall -y -q $removed
    fi
    echo "setup: installing torch==$TORCH_VERSION (pip shows the download's progress)"
    pip install --progress-bar on "torch==$TORCH_VERSION" "${index_args[@]}"
    torch_build >/dev/null || { echo "setup: torch did not install; see pip's messages above" >&2; exit 1; }
fi
python -W ignore -c "import torch; print('setup: torch', torch.__version__, '(CUDA ' + str(torch.version.cuda) + ')' if torch.version.cuda else '(CPU only)')"

# llama-models (Meta's reference: tokenizer.model, test oracles) is installed with its own small
# dependencies, in the same pip run as llama3, so pip's resolver has nothing to complain about.
# Setuptools' "Editable installation" notice goes to stderr of the build: kept out of sight
# unless the install fails.
case "$extra" in
    test) what="llama3 (editable) + test extras + llama-models"; targets=(-e ".[test]" llama-models) ;;
    demo) what="llama3 (editable) + llama-models (for its tokenizer.model)"; targets=(-e . llama-models) ;;
    *) what="llama3 (editable)"; targets=(-e .) ;;
esac
echo "setup: installing $what"
log=$(mktemp)
trap 'rm -f "$log" "${plan:-}" "${plan:+$plan.log}"' EXIT
if ! pip install -q "${targets[@]}" >"$log" 2>&1; then
    cat "$log" >&2
    exit 1
fi
grep -v -E '^\s*$' "$log" | grep -i -E 'error|warning' | grep -v -i 'editable' || true
echo "setup: done. In every new shell: source .venv/bin/activate"
