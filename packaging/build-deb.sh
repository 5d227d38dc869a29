#!/usr/bin/env bash
# `make deb`: build dist/storage-agent_<version>_<arch>.deb with dpkg-buildpackage from a clean
# copy of the source tree (debian/ comes from packaging/debian), then check it with lintian.
#   packaging/build-deb.sh            (as root, or with the Build-Depends already installed)
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' agent/__init__.py)
changelog=$(sed -n '1s/^storage-agent (\([^)]*\)).*/\1/p' packaging/debian/changelog)
if [[ "$version" != "$changelog" ]]; then
    echo "build-deb: agent/__init__.py says $version but packaging/debian/changelog says $changelog" >&2
    exit 1
fi

# The build tools and the Build-Depends of debian/control, only what is missing.
tools=(dpkg-dev debhelper lintian fakeroot)
missing=()
for p in "${tools[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})) || ! dpkg-checkbuilddeps -d "$(sed -n '/^Build-Depends:/,/^[A-Z]/p' packaging/debian/control \
        | sed '1s/^Build-Depends://; /^[A-Z]/d' | tr -d '\n')" /dev/null 2>/dev/null; then
    if [[ $(id -u) -ne 0 ]]; then
        echo "build-deb: missing build dependencies (run as root, or: apt-get build-dep ./packaging)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    ((${#missing[@]})) && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    src=$(mktemp -d)
    cp -r packaging/debian "$src/debian"
    apt-get build-dep -y -qq "$src" >/dev/null
    rm -rf "$src"
fi

work=build/deb
rm -rf "$work"
tree="$work/storage-agent-$version"
mkdir -p "$tree"
# The whole source tree but what is local state, build output or not shipped (tests, benchmarks).
tar -c --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist --exclude=./var --exclude=./tests \
    --exclude=./bench --exclude=./.ruff_cache --exclude=__pycache__ --exclude='*.so' --exclude='*.egg-info' . \
    | tar -x -C "$tree"
[[ -f "$tree/README.md" ]] || echo "# storage-agent" > "$tree/README.md"
mv "$tree/packaging/debian" "$tree/debian"

# Wheels built here link against Debian's python3.11: keep them apart from any other pip cache.
export PIP_CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/storage-agent-deb/pip"
(cd "$tree" && COLUMNS=80 dpkg-buildpackage -us -uc -b --no-sign >../build.log 2>&1) || {
    tail -n 60 "$work/build.log" >&2
    echo "build-deb: dpkg-buildpackage failed; full log in $work/build.log" >&2
    exit 1
}
deb=$(ls "$work"/storage-agent_"${version}"_*.deb)
mkdir -p dist
rm -f dist/storage-agent_*.deb
cp "$deb" dist/
deb="dist/$(basename "$deb")"

# Lintian: errors fail the build; warnings are shown.
lintian --fail-on error --suppress-tags-from-file /dev/null "$deb" | tee "$work/lintian.log" || {
    echo "build-deb: lintian found errors (see above)" >&2
    exit 1
}
echo "build-deb: built $deb"
