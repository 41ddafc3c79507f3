#!/usr/bin/env bash
# First-touch cost of anonymous memory on this host: builds bench/firsttouch.c
# with the system C compiler into a temporary directory and runs it.
#
#   bench/firsttouch.sh [MIB]     default 1024; use more than the memory the
#                                 machine used recently to see the cold case
set -euo pipefail
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cc -O2 -o "$dir/firsttouch" "$(dirname "${BASH_SOURCE[0]}")/firsttouch.c"
"$dir/firsttouch" "${1:-1024}"
