#!/usr/bin/env bash
# Lists the C++ files that differ from .clang-format (the same files `make format` rewrites) and
# fails if there is any. Run by `make format-check` (part of `make test`).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v clang-format >/dev/null || { echo "check_format.sh: clang-format is missing (Debian: clang-format)" >&2; exit 1; }
differ=()
while IFS= read -r -d '' f; do
  clang-format --style=file "$f" | cmp -s - "$f" || differ+=("$f")
done < <(find include src tests tools bench examples \( -name '*.h' -o -name '*.cc' \) -print0 | sort -z)
if [ ${#differ[@]} -ne 0 ]; then
  echo "format-check: ${#differ[@]} file(s) differ from .clang-format ($(clang-format --version)); run 'make format':" >&2
  printf '  %s\n' "${differ[@]}" >&2
  exit 1
fi
echo "format-check: every file follows .clang-format"
