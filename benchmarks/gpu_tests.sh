#!/usr/bin/env bash
# The GPU test stage of gpu_check.sh: one pytest process per group, side by side, their logs printed
# one after another at the end (also when a timeout ends the stage: the groups are stopped and their
# partial logs printed). A cold Triton cache makes these runs compile-bound, one CPU core each, and
# the GPU work is small; a group of its own also keeps a crash in one from taking the others along.
#
#   benchmarks/gpu_tests.sh "tests/a.py tests/b.py" "tests/c.py"     # PYTHON (python3) runs pytest
#
# Exit status: 0 when every group passed, else the largest status of a group (124 after a timeout).
set -u
export PYTHONUNBUFFERED=1  # a group stopped by the timeout keeps what it printed
PY=${PYTHON:-python3}
GROUP_FILES=("$@")
LOGS=$(mktemp -d)
PIDS=()
(( ${#GROUP_FILES[@]} )) || { echo "gpu_tests: no test group given" >&2; exit 2; }

print_logs() {
    for i in "${!GROUP_FILES[@]}"; do
        echo "===== pytest group $((i + 1)) of ${#GROUP_FILES[@]}: ${GROUP_FILES[$i]}"
        cat "$LOGS/$i.log" 2>/dev/null
    done
}

stopped() {  # the stage's timeout: stop the groups, keep what they printed
    trap - TERM INT
    for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill -TERM "$pid" 2>/dev/null; done
    sleep 2
    for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill -KILL "$pid" 2>/dev/null; done
    print_logs
    rm -rf "$LOGS"
    echo "gpu_tests: stopped by a signal before every group finished"
    exit 124
}
trap stopped TERM INT

for i in "${!GROUP_FILES[@]}"; do
    # shellcheck disable=SC2086  # a group is a space-separated list of test files
    env -u TRITON_INTERPRET "$PY" -m pytest -q -rfEs -p no:cacheprovider --durations=5 ${GROUP_FILES[$i]} \
        > "$LOGS/$i.log" 2>&1 &
    PIDS+=($!)
done
worst=0
for pid in "${PIDS[@]}"; do
    wait "$pid"
    rc=$?
    (( rc > worst )) && worst=$rc
done
print_logs
rm -rf "$LOGS"
exit "$worst"
