#!/usr/bin/env bash
# Runs every fuzz target for a bounded time and prints how many inputs each ran.
#
#   fuzz/run.sh [SECONDS_PER_TARGET [TARGET...]]   (default 120 s; every target of
#                                                    `cargo fuzz list` unless named)
#
# Only decode_mqtt needs etlmesh-stream (and so DataFusion, a long sanitizer build):
# the other targets build without it (--no-default-features).
#
# cargo fuzz builds with libFuzzer and AddressSanitizer, which need -Z flags: the
# stable toolchain accepts them with RUSTC_BOOTSTRAP=1. Corpora grow in fuzz/corpus,
# crashes land in fuzz/artifacts/TARGET with the command that replays them.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-120}
shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
mkdir -p logs
status=0
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    features=--no-default-features
    [ "$t" = decode_mqtt ] && features=
    # shellcheck disable=SC2086 # $features is one flag or none
    if cargo fuzz run $features "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$secs" -rss_limit_mb=4096 -timeout=20 >"logs/$t.log" 2>&1; then
        runs=$(grep -Eo 'Done [0-9]+ runs' "logs/$t.log" | tail -1)
        printf '%-16s ok     %s in %s s, corpus %s inputs\n' "$t" "${runs:-?}" "$secs" "$(ls "corpus/$t" | wc -l)"
    else
        status=1
        printf '%-16s FAILED (see fuzz/logs/%s.log and fuzz/artifacts/%s)\n' "$t" "$t" "$t"
        grep -E 'panicked|ERROR|SUMMARY' "logs/$t.log" | head -5 || true
    fi
done
exit $status
