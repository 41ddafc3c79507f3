#!/usr/bin/env bash
# Page placement rate into cold, backed memory on this host, memcpy against
# non-temporal stores: builds bench/placecopy.c with the system C compiler
# into a temporary directory and runs it.
#
#   bench/placecopy.sh [MIB]     default 512
set -euo pipefail
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cc -O2 -o "$dir/placecopy" "$(dirname "${BASH_SOURCE[0]}")/placecopy.c"
"$dir/placecopy" "${1:-512}"
