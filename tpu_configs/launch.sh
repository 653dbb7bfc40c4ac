#!/usr/bin/env bash
# Runs malt-jax on every worker of a Cloud TPU VM slice (one JAX process per host).
#
#   TPU=my-slice ZONE=us-east5-a tpu_configs/launch.sh sync
#   TPU=my-slice ZONE=us-east5-a tpu_configs/launch.sh install
#   TPU=my-slice ZONE=us-east5-a tpu_configs/launch.sh run   v5p-64 experiments/llama31_8b_gsm8k.yaml [key=value ...]
#   TPU=my-slice ZONE=us-east5-a tpu_configs/launch.sh train v5p-64 experiments/llama31_8b_gsm8k.yaml
#                                 tpu_configs/launch.sh plan  v5p-64 experiments/llama31_8b_gsm8k.yaml   (local)
#
# Commands
#   sync      copy this working tree to $REMOTE_DIR on every worker (gcloud ... scp --worker=all)
#   install   create $REMOTE_DIR/.venv on every worker and install malt-jax with jax[tpu]
#   run|expand|credit|train|eval|rl SLICE CONFIG [key=value ...]
#             the same `malt-jax <stage>` on every worker (gcloud ... ssh --worker=all), with the
#             tpu_configs/SLICE.yaml overlay (mesh + batch settings) flattened into key=value
#             overrides and MALT_DISTRIBUTED=1, so malt_jax.parallel.distributed.initialize() connects the
#             processes at start-up (JAX auto-detects coordinator, process count and rank on TPU VMs)
#   plan SLICE CONFIG [key=value ...]
#             the per-device memory plan of CONFIG with that overlay, locally (no TPU needed)
#
# Environment
#   TPU, ZONE      the TPU VM name and zone (required for sync/install/run)
#   PROJECT        GCP project (optional; default: gcloud's configured project)
#   REMOTE_DIR     checkout on the workers (default: malt-jax, i.e. ~/malt-jax)
#   LOCAL_PYTHON   python with malt-jax importable here (default: .venv/bin/python, else python3)
#   DRY_RUN=1      print the gcloud commands instead of running them
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
REMOTE_DIR="${REMOTE_DIR:-malt-jax}"
if [[ -z "${LOCAL_PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then LOCAL_PYTHON="$REPO/.venv/bin/python"; else LOCAL_PYTHON=python3; fi
fi

usage() { sed -n '2,28p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

run_cmd() {  # prints (DRY_RUN=1) or runs a command given as separate words
  if [[ "${DRY_RUN:-0}" == "1" ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

need_tpu() {
  [[ -n "${TPU:-}" && -n "${ZONE:-}" ]] || { echo "launch.sh: set TPU=<tpu vm name> and ZONE=<zone>" >&2; exit 2; }
  GCLOUD_SCOPE=(--zone "$ZONE")
  [[ -n "${PROJECT:-}" ]] && GCLOUD_SCOPE+=(--project "$PROJECT")
  return 0
}

on_all_workers() {  # on_all_workers "<shell command run on every worker>"
  need_tpu
  run_cmd gcloud compute tpus tpu-vm ssh "$TPU" "${GCLOUD_SCOPE[@]}" --worker=all --command="$1"
}

overlay_args() {  # key=value overrides of tpu_configs/$1.yaml, each shell-quoted
  local overlay="$HERE/$1.yaml"
  [[ -f "$overlay" ]] || { echo "launch.sh: no overlay $overlay (have: $(cd "$HERE" && ls *.yaml | tr '\n' ' '))" >&2; exit 2; }
  (cd "$REPO" && "$LOCAL_PYTHON" -c '
import shlex, sys
from malt_jax.planning.units import overlay_overrides
print(" ".join(shlex.quote(o) for o in overlay_overrides(sys.argv[1])))' "$overlay")
}

overlay_plan_args() {  # --device/--devices from the overlay's plan: section
  (cd "$REPO" && "$LOCAL_PYTHON" -c '
import sys
from malt_jax.planning.units import load_overlay
p = load_overlay(sys.argv[1]).get("plan") or {}
print(" ".join(f"--{k} {v}" for k, v in p.items() if k in ("device", "devices")))' "$HERE/$1.yaml")
}

cmd="${1:-}"; [[ -n "$cmd" ]] || usage
shift
case "$cmd" in
  -h|--help|help) usage 0 ;;
  sync)
    need_tpu
    tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
    # tracked + untracked-but-not-ignored files only (no .venv, runs/, caches)
    (cd "$REPO" && git ls-files -co --exclude-standard -z | tar --null -T - -czf "$tmp/malt-jax.tgz")
    run_cmd gcloud compute tpus tpu-vm scp "$tmp/malt-jax.tgz" "$TPU:malt-jax.tgz" "${GCLOUD_SCOPE[@]}" --worker=all
    on_all_workers "mkdir -p $REMOTE_DIR && tar -xzf malt-jax.tgz -C $REMOTE_DIR && rm malt-jax.tgz"
    ;;
  install)
    on_all_workers "cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -U pip \
&& .venv/bin/pip install -q -e . 'jax[tpu]' && .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_devices())'"
    ;;
  plan)
    [[ $# -ge 2 ]] || usage
    slice="$1" config="$2"; shift 2
    (cd "$REPO" && run_cmd "$LOCAL_PYTHON" -m malt_jax plan "$config" --overlay "$HERE/$slice.yaml" "$@")
    ;;
  run|expand|credit|train|eval|rl)
    [[ $# -ge 2 ]] || usage
    slice="$1" config="$2"; shift 2
    ovr="$(overlay_args "$slice")"
    extra=""
    for a in "$@"; do extra+=" $(printf '%q' "$a")"; done
    name="$(basename "$config" .yaml)"
    remote="cd $REMOTE_DIR && mkdir -p logs && MALT_DISTRIBUTED=1 .venv/bin/malt-jax $cmd $(printf '%q' "$config") \
$ovr$extra --no-progress 2>&1 | tee -a logs/$name-$slice-\$(hostname).log"
    on_all_workers "$remote"
    ;;
  *) echo "launch.sh: unknown command $cmd" >&2; usage ;;
esac
