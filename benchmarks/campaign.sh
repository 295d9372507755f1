#!/usr/bin/env bash
# The benchmark of record at scale (issue 11), as resumable stages run in order against a vLLM
# server. Every stage is one `ets compare` (run directories under $RUNS resume: finished problems
# are skipped and still reported), so a session that must stop kills this script (or sets UNTIL)
# and the next session runs the same command again.
#
#   bash benchmarks/bench-model.sh                               # prints the GGUF's path
#   ets serve PATH.gguf --port 8000 --kv-cache-gb 4 &            # ~1.5 min to start
#   UNTIL=14:50 bash benchmarks/campaign.sh                      # every stage, in order, until 14:50 UTC
#   bash benchmarks/campaign.sh bon16 gsm8k-w16                  # chosen stages
#   bash benchmarks/campaign.sh --list                           # the stages and their commands
#
# Stage memory-bound (issue 11 item 3) runs only when named, against a server restarted with a
# small KV cache: `ets serve PATH.gguf --kv-cache-gb 1 --max-model-len 2048 --
# --num-gpu-blocks-override 100` (100 blocks x 32 = 3,200 tokens, room for about 20 of the search's
# sequences; REBASE's 16 problems in flight ask for up to 256). A 28,000-token cache (875 blocks)
# was tried first (2026-12-01): the server ran its 128-sequence maximum at 64-72% of the cache with
# no preemption for 25 minutes, so the cache did not bind. It refuses a server whose cache is not
# exactly 3,200 tokens (its run directories, $RUNS/memory-bound-3200, are named for that cache: the
# record's first problems, recomputed under it) and times each method (chunked schedule).
#
# Environment: POLICY (default http://127.0.0.1:8000), RUNS (run directories, default runs; keep
# them out of git), OUT (results root, default benchmarks/results), CONCURRENCY (problems in flight,
# default 64: with a barrier per depth a problem has only some of its W sequences running, and
# the 2-core vLLM CPU build batches 128), SCHEDULE (pooled, the default: accuracy and KV fastest;
# chunked: each method's chunk of CONCURRENCY problems alone on the server, so its tok/s and
# problems/s are measured, at the cost of the chunk's tail),
# UNTIL (HH:MM UTC): no problem starts after UNTIL - DRAIN minutes (default 40; `ets compare
# --admit-until`), so the problems in flight can finish; at UNTIL the stage is stopped (a problem
# still running then is lost, the finished ones are on disk).
#
# Nothing else should run on the machine meanwhile: vLLM's CPU build (OpenMP threads on every
# core) slows to a crawl when another process takes a core.
set -euo pipefail
cd "$(dirname "$0")/.."

POLICY="${POLICY:-http://127.0.0.1:8000}"
RUNS="${RUNS:-runs}"
OUT="${OUT:-benchmarks/results}"
CONCURRENCY="${CONCURRENCY:-64}"
DRAIN="${DRAIN:-40}"
SCHEDULE="${SCHEDULE:-pooled}"
ETS="${ETS:-ets}"
MODEL="Qwen2.5-Coder-0.5B-Instruct on vLLM (CPU build)"
# The same sampling for every method and stage (issue 11: T=0.8, >= 512 tokens, the model's blank-line steps).
COMMON=(--policy "$POLICY" --temperature 0.8 --max-tokens 512 --max-step-tokens 256 --step-delimiter '\n\n'
        --concurrency "$CONCURRENCY" --schedule "$SCHEDULE" --request-timeout 3600 --runs-dir "$RUNS" --no-progress)

# The memory-bound stage's cache: blocks of 32 tokens (ets serve's block size); its run directory,
# title and server check are derived from it.
MB_BLOCKS=100
MB_TOKENS=$((MB_BLOCKS * 32))

# name | ets compare arguments (besides COMMON) — in the order the issue asks for them.
# The frontier (item 4): lambda_c 0.5/1/2/4 at the paper's lambda_s (1.5 at W=16), lambda_s 0 and
# 2x at lambda_c 1, the token node cost, and one hard KV budget (600 kept tokens: REBASE kept
# 1,066 a decision in the replay of the first 22 problems, replay-w16.md), most telling first.
# gsm8k-w16-lc2 carries the frontier's lambda_c 2 (on 24 problems: REBASE's accuracy at 1.20x
# less KV; under the memory-bound cache 1.14x tok/s) to the record's 100 problems, paired with the
# record's REBASE and ETS (the same run directories: their finished problems are reused).
# frontier-w16-64 carries the frontier's two telling settings to 64 problems (frontier-w16's run
# directories: its first 24 are reused): lambda_c 4, the most KV saved (1.54x on 24, and 1.59x
# tok/s where memory binds) with an accuracy cost seen in one draw of 24 and not in another; and
# lambda_s 0, the coverage term off (1.19x KV at REBASE's outcomes on every one of the 24, no
# embedder).
# gsm8k-w16-beam-dvts runs the record's two other baselines with REBASE and ETS again beside them
# (on the machine and dtype of the run, so that the pairing is like for like; the record's run
# directories were lost with its machine; benchmarks/pair_results.py pairs with the record too).
# learned-prm-train (issue 14) is `ets train-prm`, not `ets compare` (a stage whose arguments begin
# with a subcommand runs that one, with COMMON less --schedule): outcome-labelled rollouts of 1,000
# GSM8K *train* problems x 4 (the first file of record had 128 x 4, too few for its vote to beat the
# majority), the statistics head fitted on them; cut short, it resumes, or `--fit-done` fits on the
# finished ones.
# learned-prm-w16 runs REBASE and ETS under the learned PRM only (two configs, 7,289 s here at CONCURRENCY=32): the default-PRM
# arms are the record's (record-vllm-qwen-gsm8k-w16, same 100 problems), paired by benchmarks/pair_results.py.
# math500-bon16: best-of-16 trees of MATH500 test problems, to judge the GSM8K-trained learned PRM on
# another dataset (`python benchmarks/learned_prm_eval.py FILE runs/best_of_n-w16-XXXXXXXX`).
# math500-w16 lists REBASE and ETS first: the pooled schedule runs a problem's configs in turn, so
# a stage cut short by UNTIL leaves the last configs with the fewest problems (run it as
# `--methods rebase,ets` first, then the rest, to be sure of the pair).
# claim-ref-* (issue 37): the claim under the reference PRM (ets.prm.reference: it KNOWS THE ANSWERS, an
# instrument that makes PRM quality a dial), at the three noise levels chosen by `ets worth` on the
# 200 held-out best-of-16 trees (docs/results.md: open-prefix AUROC 0.681 / 0.634 / 0.582 at noise
# 0 / 1.5 / 3); 100 problems at the top level, 50 at the others; beam and DVTS at the top level on
# 50 (REBASE beside them: the same run directory as claim-ref-top's, so its problems are reused);
# W=64 at the level whose W=16 ratio is highest (set when it is known; noise 0 until then).
# math500-w16-baselines is that rest: the record's REBASE and ETS were run first and committed (their
# run directories were lost with their machine), so its baselines are paired with the committed
# record by benchmarks/pair_results.py (best-of-16 reuses the run directory of problems 0-31).
STAGES=(
  "bon16|--methods best_of_n --widths 16 --limit 100 --out $OUT/prm-signal-bon16-gsm8k --title 'Best-of-16 on GSM8K, $MODEL, T=0.8, 512 tokens'"
  "gsm8k-w16|--methods best_of_n,rebase,ets --widths 16 --limit 100 --out $OUT/record-vllm-qwen-gsm8k-w16 --title 'GSM8K W=16, $MODEL, T=0.8, 512 tokens'"
  "frontier-w16|--methods rebase,ets,ets:lambda_c=2,ets:lambda_c=4,ets:lambda_s=0,ets:lambda_c=2/node_cost=tokens,ets:kv_budget=600,ets:lambda_c=0.5,ets:lambda_s=3 --widths 16 --limit 24 --out $OUT/frontier-vllm-qwen-gsm8k-w16 --title 'ETS frontier, GSM8K W=16, $MODEL, T=0.8, 512 tokens'"
  "frontier-w16-64|--methods rebase,ets:lambda_c=4,ets:lambda_s=0 --widths 16 --limit 64 --out $OUT/frontier-vllm-qwen-gsm8k-w16-64 --title 'ETS frontier carried to 64 problems: lambda_c 4 and lambda_s 0 beside REBASE, GSM8K W=16, $MODEL, T=0.8, 512 tokens'"
  "gsm8k-w16-beam-dvts|--methods beam,dvts,rebase,ets --widths 16 --limit 100 --out $OUT/record-vllm-qwen-gsm8k-w16-beam-dvts --title 'GSM8K W=16, beam search and DVTS beside REBASE and ETS, $MODEL, T=0.8, 512 tokens'"
  "math500-w16|--dataset math500 --methods rebase,ets,ets:lambda_c=2,best_of_n,dvts,beam --widths 16 --limit 100 --out $OUT/record-vllm-qwen-math500-w16 --title 'MATH500 W=16, $MODEL, T=0.8, 512 tokens'"
  "math500-w16-baselines|--dataset math500 --methods best_of_n,dvts,beam --widths 16 --limit 100 --out $OUT/record-vllm-qwen-math500-w16-baselines --title 'MATH500 W=16, best-of-16, DVTS and beam search (paired with the record by pair_results.py), $MODEL, T=0.8, 512 tokens'"
  "gsm8k-w64|--methods rebase,ets --widths 64 --limit 50 --out $OUT/record-vllm-qwen-gsm8k-w64 --title 'GSM8K W=64, $MODEL, T=0.8, 512 tokens'"
  "gsm8k-w16-lc2|--methods rebase,ets,ets:lambda_c=2 --widths 16 --limit 100 --out $OUT/record-vllm-qwen-gsm8k-w16-lambda-c2 --title 'GSM8K W=16, ETS at lambda_c 2 beside the record, $MODEL, T=0.8, 512 tokens'"
  "learned-prm-train|train-prm --dataset gsm8k-train --limit 1000 --samples 4 --features stats --runs-dir $RUNS/prm --out $OUT/learned-prm-stats-1000/learned-stats-qwen2.5-coder-0.5b-t08-1000.npz"
  "learned-prm-w16|--methods rebase,ets --widths 16 --limit 100 --prm learned:benchmarks/results/learned-prm-stats-1000/learned-stats-split-qwen2.5-coder-0.5b-t08-1000.npz --out $OUT/record-vllm-qwen-gsm8k-w16-learned-prm-1000 --title 'GSM8K W=16, REBASE and ETS under the learned statistics PRM of 572 train problems (issue 14; paired with the record by pair_results.py), $MODEL, T=0.8, 512 tokens'"
  "math500-bon16|--dataset math500 --methods best_of_n --widths 16 --limit 100 --out $OUT/prm-signal-bon16-math500 --title 'Best-of-16 on MATH500 (issue 14: does the learned PRM carry over? learned_prm_eval.py on its trees), $MODEL, T=0.8, 512 tokens'"
  "bon16-200|--methods best_of_n --widths 16 --limit 200 --out $OUT/prm-signal-bon16-gsm8k-200 --title 'Best-of-16 on 200 GSM8K test problems (issue 14: the learned PRM on >= 200 held-out problems), $MODEL, T=0.8, 512 tokens'"
  "claim-ref-top|--methods rebase,ets,ets:lambda_c=4 --widths 16 --limit 100 --prm reference --out $OUT/claim-reference-w16-noise0 --title 'The claim under a PRM of known quality: GSM8K W=16 under reference(noise=0) (KNOWS THE ANSWERS: a benchmarking instrument), $MODEL, T=0.8, 512 tokens'"
  "claim-ref-mid|--methods rebase,ets,ets:lambda_c=4 --widths 16 --limit 50 --prm 'reference?noise=1.5' --out $OUT/claim-reference-w16-noise1.5 --title 'The claim under a PRM of known quality: GSM8K W=16 under reference(noise=1.5) (KNOWS THE ANSWERS: a benchmarking instrument), $MODEL, T=0.8, 512 tokens'"
  "claim-ref-low|--methods rebase,ets,ets:lambda_c=4 --widths 16 --limit 50 --prm 'reference?noise=3' --out $OUT/claim-reference-w16-noise3 --title 'The claim under a PRM of known quality: GSM8K W=16 under reference(noise=3) (KNOWS THE ANSWERS: a benchmarking instrument), $MODEL, T=0.8, 512 tokens'"
  "claim-ref-beam-dvts|--methods beam,dvts,rebase --widths 16 --limit 50 --prm reference --out $OUT/claim-reference-w16-noise0-beam-dvts --title 'Beam search and DVTS beside REBASE under reference(noise=0) (KNOWS THE ANSWERS: a benchmarking instrument), GSM8K W=16, $MODEL, T=0.8, 512 tokens'"
  "claim-ref-w64|--methods rebase,ets,ets:lambda_c=4 --widths 64 --limit 32 --prm reference --out $OUT/claim-reference-w64-noise0 --title 'The claim at W=64 under reference(noise=0) (KNOWS THE ANSWERS: a benchmarking instrument), GSM8K, $MODEL, T=0.8, 512 tokens'"
  "memory-bound|--methods rebase,ets,ets:lambda_c=2,ets:lambda_c=4 --widths 16 --limit 16 --concurrency 16 --schedule chunked --runs-dir $RUNS/memory-bound-$MB_TOKENS --out $OUT/memory-bound-vllm-qwen-gsm8k-w16 --title 'Memory-bound GSM8K W=16, $MODEL with a $MB_TOKENS-token KV cache ($MB_BLOCKS blocks), T=0.8, 512 tokens'"
)
NAMED_ONLY=" memory-bound "  # stages that run only when named (they need a differently started server)

server_kv_tokens() {  # the server's KV capacity in tokens (ets.engines.server_metrics reads /metrics)
  "$(dirname "$(command -v "$ETS")")/python" - "$POLICY" <<'PY'
import sys, urllib.request
from ets.engines.server_metrics import snapshot
cap = snapshot(urllib.request.urlopen(sys.argv[1].rstrip("/") + "/metrics", timeout=30).read().decode()).kv_capacity_tokens
print(int(cap) if cap else "")
PY
}

command_of() {  # a stage's arguments -> cmd=(SUBCOMMAND COMMON... ARGS...), common=(the COMMON it takes)
  local i
  if [ "$1" = train-prm ]; then
    common=()
    for ((i = 0; i < ${#COMMON[@]}; i++)); do  # train-prm samples best-of-N: no --schedule
      if [ "${COMMON[i]}" = --schedule ]; then i=$((i + 1)); else common+=("${COMMON[i]}"); fi
    done
    cmd=(train-prm "${common[@]}" "${@:2}")
  else
    common=("${COMMON[@]}")
    cmd=(compare "${COMMON[@]}" "$@")
  fi
}

deadline_left() {  # seconds until UNTIL (HH:MM UTC, today or tomorrow); empty when UNTIL is unset
  [ -n "${UNTIL:-}" ] || return 0
  local now end
  now=$(date -u +%s)
  end=$(date -u -d "$(date -u +%F) $UNTIL" +%s)
  [ "$end" -gt "$now" ] || end=$((end + 86400))
  echo $((end - now))
}

if [ "${1:-}" = "--list" ]; then
  for s in "${STAGES[@]}"; do
    eval "args=(${s#*|})"; command_of "${args[@]}"
    rest="${s#*|}"; [ "${cmd[0]}" = compare ] || rest="${rest#"${cmd[0]} "}"
    echo "${s%%|*}: $ETS ${cmd[0]} $(printf '%q ' "${common[@]}")$rest"
  done
  exit 0
fi

wanted=("$@")
for s in "${STAGES[@]}"; do
  name="${s%%|*}"
  if [ ${#wanted[@]} -gt 0 ] && [[ ! " ${wanted[*]} " =~ " $name " ]]; then continue; fi
  if [ ${#wanted[@]} -eq 0 ] && [[ "$NAMED_ONLY" =~ " $name " ]]; then continue; fi
  if [ "$name" = memory-bound ]; then
    cap=$(server_kv_tokens 2>/dev/null || true)  # empty when no server answers
    if [ "$cap" != "$MB_TOKENS" ]; then
      echo "[campaign] memory-bound needs a server with a KV cache of exactly $MB_TOKENS tokens (this one: ${cap:-unknown});" \
           "restart it: ets serve PATH.gguf --kv-cache-gb 1 --max-model-len 2048 -- --num-gpu-blocks-override $MB_BLOCKS" >&2
      exit 2
    fi
    echo "[campaign] server KV cache: $cap tokens" >&2
  fi
  left=$(deadline_left)
  if [ -n "$left" ] && [ "$left" -lt $(( DRAIN * 60 + 120 )) ]; then
    echo "[campaign] $(date -u +%H:%M) UNTIL=$UNTIL reached: stopping before $name" >&2
    exit 0
  fi
  echo "[campaign] $(date -u +%H:%M) stage $name" >&2
  eval "args=(${s#*|})"; command_of "${args[@]}"
  if [ -n "$left" ]; then
    admit=$(date -u -d "@$(( $(date -u +%s) + left - DRAIN * 60 ))" +%Y-%m-%dT%H:%M)
    # SIGINT: ets compare stops like on Ctrl-C (finished problems are on disk); rc 124 = time is up
    timeout --signal=INT --kill-after=60 "$left" "$ETS" "${cmd[@]}" --admit-until "$admit" || {
      rc=$?; [ $rc -eq 124 ] && { echo "[campaign] UNTIL=$UNTIL reached during $name" >&2; exit 0; }; exit $rc; }
  else
    "$ETS" "${cmd[@]}"
  fi
done
