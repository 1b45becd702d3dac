#!/usr/bin/env bash
# The main job on a generated sample tree: plan it, mount ferryfs over it in
# place, read a file (it migrates on first open), let the idle sweep migrate the
# rest while `status --watch` shows it, check nothing changed, unmount, verify.
# Run by `make demo`; unmounts in any case (trap), and leaves demo/ for a look
# (`make clean` removes it, and the next demo starts from a fresh tree).
#
# No pipeline here ends in a reader that stops early (`head`, `grep -q`): under
# pipefail the writer would die of SIGPIPE and the demo stop with no message.
set -euo pipefail
BIN=${BIN:-.venv/bin}
DEMO=${DEMO:-demo}
SESSIONS=${SESSIONS:-200}
SRC=$DEMO/phase3
STORE=$DEMO/phase3.ferry
ff() { echo "+ ferryfs $*"; "$BIN/ferryfs" "$@"; }

if [ ! -e "$SRC" ]; then ff sample "$SRC" --sessions "$SESSIONS" --seed 1; fi
rm -rf "$DEMO/copy" && cp -a "$SRC" "$DEMO/copy"   # to compare with afterwards
ff plan "$SRC"

mounted=0
cleanup() { if [ "$mounted" = 1 ]; then "$BIN/ferryfs" umount "$SRC" || fusermount3 -u -z "$SRC"; fi; }
trap cleanup EXIT

# Small batches with a pause between them, so that the sweep takes a few seconds
# to watch: at the defaults (64 files, 10 ms) it migrates this tree in half a
# second. --max-load 99: by default the sweep waits while other processes keep
# half the CPUs busy, and on a busy machine the demo would wait with it.
ff mount "$SRC" "$SRC" --store "$STORE" --idle-ms 300 --batch 8 --batch-delay-ms 100 \
	--max-load 99
mounted=1
ff pause "$SRC"   # the sweep waits: this shows one file migrating on its own
# The first session log in name order; sed reads all its input, unlike head.
f=$(cd "$SRC" && find sessions -name '*.jsonl' | LC_ALL=C sort | sed -n 1p)
echo "+ first open of $f (the app reads it; ferryfs serves it and migrates it)"
"$BIN/python" - "$SRC/$f" <<'EOF'
import os, sys, time
path = sys.argv[1]
def state() -> str:
    return os.getxattr(path, "user.ferryfs.state").decode()
print("  state before:", state())
with open(path, "rb") as f:
    first = f.read(100).decode(errors="replace").replace("\n", " ")
print(f"  read:         {first} ...")
start = time.monotonic()
# Served from Phase 3 at once; the migration follows at the app's next pause.
while state() != "migrated" and time.monotonic() - start < 30:
    time.sleep(0.02)
print(f"  state after:  {state()} ({time.monotonic() - start:.2f} s after the read)")
EOF
ff status "$SRC"
ff resume "$SRC"
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
ff fsck "$STORE" --deep
