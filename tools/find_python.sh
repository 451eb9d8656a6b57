#!/usr/bin/env bash
# Print the path of a Python 3.12 interpreter; with none, one line on stderr saying what to
# install, and exit 1. pyenv's bare `python3.12` shim refuses to run until that version is
# selected, so pyenv's installed 3.12.x are tried by path.
ok() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; }
for name in python3.12 python3 python; do
    path=$(command -v "$name") || continue
    if ok "$path"; then "$path" -c 'import sys; print(sys.executable)'; exit 0; fi
done
if command -v pyenv >/dev/null 2>&1; then
    root=$(pyenv root)
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -t. -k3 -n -r); do
        path="$root/versions/$v/bin/python3.12"
        if ok "$path"; then echo "$path"; exit 0; fi
    done
fi
echo "k2mcore needs Python 3.12: install it (pyenv install 3.12, or your system's python3.12 with venv), or pass PYTHON=/path/to/python3.12" >&2
exit 1
