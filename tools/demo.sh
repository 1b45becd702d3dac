#!/usr/bin/env bash
# The main job on a generated sample tree: plan it, mount ferryfs over it in
# place, read a file (it migrates on first open), let the idle sweep migrate the
# rest while `status --watch` shows it, check nothing changed, unmount, verify.
# Run by `make demo`; unmounts in any case (trap), and leaves demo/ for a look.
set -euo pipefail
BIN=${BIN:-.venv/bin}
DEMO=${DEMO:-demo}
SRC=$DEMO/phase3
STORE=$DEMO/phase3.ferry
ff() { echo "+ ferryfs $*"; "$BIN/ferryfs" "$@"; }

if [ ! -e "$SRC" ]; then ff sample "$SRC" --sessions 200 --seed 1; fi
rm -rf "$DEMO/copy" && cp -a "$SRC" "$DEMO/copy"   # to compare with afterwards
ff plan "$SRC"

mounted=0
cleanup() { if [ "$mounted" = 1 ]; then "$BIN/ferryfs" umount "$SRC" || fusermount3 -u -z "$SRC"; fi; }
trap cleanup EXIT

ff mount "$SRC" "$SRC" --store "$STORE" --idle-ms 300
mounted=1
f=$(cd "$SRC" && find sessions -name '*.jsonl' | sort | head -1)
echo "+ first open of $f"
python3 -c 'import os,sys; print("  state before:", os.getxattr(sys.argv[1], "user.ferryfs.state").decode())' "$SRC/$f" || true
head -c 120 "$SRC/$f"; echo " ..."
python3 -c 'import os,sys; print("  state after: ", os.getxattr(sys.argv[1], "user.ferryfs.state").decode())' "$SRC/$f"
ff status "$SRC" --watch --interval 0.5
# Search the live mount: the index answers for what it holds, and reads the rest.
ff search "$SRC" error session --limit 5
ff search "$SRC" '"the user"' --json --limit 1
echo "+ diff -r $DEMO/copy $SRC (the app sees the same files)"
diff -r "$DEMO/copy" "$SRC" && echo "  identical"
ff umount "$SRC"
mounted=0
echo "+ the Phase 3 tree underneath is untouched:"
diff -r "$DEMO/copy" "$SRC" && echo "  identical"
ff stats "$STORE"
if "$BIN/ferryfs" fsck --help >/dev/null 2>&1; then ff fsck "$STORE" --deep; fi
