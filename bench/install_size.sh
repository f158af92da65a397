#!/usr/bin/env bash
# The default install (`pip install .`, no extras) of this checkout against commit REV, side by side:
# install time, site-packages size, packages, and the size outside torch and its CUDA libraries.
#     bash bench/install_size.sh a5bdc08
set -euo pipefail
base=${1:?usage: bench/install_size.sh REV}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/sparc-size-XXXX)
trap 'rm -rf "$work"' EXIT
mkdir "$work/src-base" "$work/src-this"
git -C "$root" archive "$base" | tar -x -C "$work/src-base"
git -C "$root" archive HEAD | tar -x -C "$work/src-this"
printf "| install | seconds | site-packages (MB) | packages | torch + nvidia + triton (MB) | the rest (MB) |\n|---|---|---|---|---|---|\n"
for v in base this; do
  python3 -m venv "$work/venv-$v"
  t0=$(date +%s)
  "$work/venv-$v/bin/pip" install -q "$work/src-$v" >/dev/null 2>&1
  t1=$(date +%s)
  sp="$work/venv-$v/lib/python3.11/site-packages"
  total=$(du -sm "$sp" | cut -f1)
  heavy=$(du -smc "$sp"/torch "$sp"/nvidia "$sp"/triton 2>/dev/null | tail -1 | cut -f1)
  n=$("$work/venv-$v/bin/pip" list --format=freeze 2>/dev/null | wc -l)
  name=$([ "$v" = base ] && echo "$base" || git -C "$root" rev-parse --short HEAD)
  echo "| $name | $((t1 - t0)) | $total | $n | $heavy | $((total - heavy)) |"
done
