#!/usr/bin/env bash
# Runs inside the kernel-tier guest (booted by tests/kernel/harness.py): load the modules, create
# the mtty mdevs, mount debugfs, then run pytest against the project checkout.
#
#   guest-setup.sh RUNDIR
#
# RUNDIR is the one directory the guest can write to the host (virtme-ng --rwdir). In it:
#   config.env    (from the host)  REPO, KVER, VFIO_KO, MTTY_KO, CI, PYTEST_ARGS=(...)
#   guest.json    (written here)   kernel release and the mdevs, for the tests (VFMIG_KERNEL_GUEST)
#   pytest.log, junit.xml          the guest's pytest run
#   dmesg.txt                      the guest's kernel log, after pytest
#   uptime                         "start|ready|done <guest uptime>" lines, for the timings
#   setup-error                    one line, when setup failed before pytest
#   status                         pytest's exit status; written last (its absence = no result)
set -uo pipefail
run=${1:?usage: guest-setup.sh RUNDIR}
# shellcheck source=/dev/null
source "$run/config.env"

mark() { echo "$1 $(cut -d' ' -f1 /proc/uptime)" >> "$run/uptime"; }
fail() {
  echo "$*" > "$run/setup-error"
  dmesg > "$run/dmesg.txt" 2>&1
  echo "[guest] setup failed: $*" >&2
  exit 4
}
mark start

# The debugfs vfio.ko first: once the stock one is in, it would stay. modprobe then sees vfio
# loaded and brings the stock vfio_iommu_type1 and mdev on top (same exported CRCs).
insmod "$VFIO_KO" || fail "insmod $VFIO_KO"
modprobe vfio_iommu_type1 || fail "modprobe vfio_iommu_type1"
modprobe mdev || fail "modprobe mdev"
insmod "$MTTY_KO" || fail "insmod $MTTY_KO"
if ! mountpoint -q /sys/kernel/debug; then
  mount -t debugfs debugfs /sys/kernel/debug || fail "mount debugfs"
fi

# Two 2-port devices and one 1-port device: mtty-2 -> mtty-2 migrates, mtty-2 -> mtty-1 fails
# (96 vs 60 bytes of state), a natural failing migration.
types=/sys/class/mdev_bus/mtty/mdev_supported_types
mdevs=()
for type in mtty-2 mtty-2 mtty-1; do
  uuid=$(cat /proc/sys/kernel/random/uuid)
  echo "$uuid" > "$types/$type/create" || fail "create a $type mdev in $types/$type"
  mdevs+=("{\"uuid\": \"$uuid\", \"type\": \"$type\"}")
done
joined=$(IFS=,; echo "${mdevs[*]}")
cat > "$run/guest.json" <<EOF
{"kernel": "$(uname -r)", "expected_kernel": "$KVER", "debugfs": "/sys/kernel/debug",
 "vfio_ko": "$VFIO_KO", "mtty_ko": "$MTTY_KO", "mdevs": [$joined]}
EOF
echo "[guest] $(uname -r): modules loaded, mdevs ${mdevs[*]}"
mark ready

cd "$REPO" || fail "cd $REPO"
python="$REPO/.venv/bin/python"
# The guest sees the host's files with the rights of the user running QEMU on the host.
"$python" -c "" 2>/dev/null ||
  fail "$python does not run in the guest (missing, or outside what the host user can read)"
# The checkout is read-only here: no bytecode, no pytest cache. -P keeps the checkout off
# sys.path (top-level protocol/ and tui/ must never be importable). Plugins are not
# autoloaded: under TCG importing hypothesis takes ~15 s and trio ~6 s, and the tier's tests
# need neither (a test that does imports it itself).
export PYTHONDONTWRITEBYTECODE=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
export VFMIG_KERNEL_GUEST="$run/guest.json"
# tests/device/test_conformance.py runs against mtty mdevs (tests/device/conftest.py).
export VFMIG_CONFORMANCE_BACKEND="$REPO/tests/kernel/conformance_mtty.py"
if [ -n "$CI" ]; then export CI; else unset CI; fi
"$python" -P -m pytest -p no:cacheprovider --junitxml="$run/junit.xml" \
  "${PYTEST_ARGS[@]}" 2>&1 | tee "$run/pytest.log"
status=${PIPESTATUS[0]}
mark done
dmesg > "$run/dmesg.txt" 2>&1
echo "$status" > "$run/status.tmp" && mv "$run/status.tmp" "$run/status"
exit "$status"
