#!/usr/bin/env bash
# Every table in docs/figures/, rewritten by the command that makes it (each file names its own
# command line and the commit it ran at). From the repository root, in the venv:
#   bash docs/figures/regenerate.sh            # all of them
#   bash docs/figures/regenerate.sh plans      # one group: plans | parity | bench | samples
# The plans and the parity tables do not depend on the machine's load; the bench's latencies
# do, so run `bench` on an otherwise idle machine (its header records the load average).
set -euo pipefail
cd "$(dirname "$0")/../.."
F=docs/figures
OUT=bench-results/figures  # the tools' full outputs (runs, images, plots); git ignores it

plans() {
  for s in sync_patch ulysses tensor distrifusion; do
    python -m paraflow.plan model=flux_arch height=2048 width=2048 +strategy=$s \
      launcher.devices=8 --figure $F/plan_flux_2048_8_$s.md >/dev/null
  done
  # the parallel toolbox (issue 26) at 2048² and 4096²: ring, USP 4×2, PipeFusion, sharded
  # sync_patch, with sync_patch and Ulysses at 4096² beside them
  local toolbox=("ring:+strategy=ring" "usp_4x2:+strategy=usp strategy.ulysses_degree=4 strategy.ring_degree=2"
                 "pipefusion:+strategy=pipefusion"
                 "sync_patch_sharded:+strategy=sync_patch strategy.shard_weights=true pipeline.stages.encode.offload=none")
  for size in 2048 4096; do
    for entry in "${toolbox[@]}"; do
      # shellcheck disable=SC2086  # the overrides are words
      python -m paraflow.plan model=flux_arch height=$size width=$size ${entry#*:} \
        launcher.devices=8 --figure $F/plan_flux_${size}_8_${entry%%:*}.md >/dev/null
    done
  done
  for s in sync_patch ulysses; do
    python -m paraflow.plan model=flux_arch height=4096 width=4096 +strategy=$s \
      launcher.devices=8 --figure $F/plan_flux_4096_8_$s.md >/dev/null
  done
  local sdxl=(model=sdxl_arch height=3840 width=3840 launcher.accelerator=cuda plan_memory_gb=80
              pipeline.stages.denoise.precision=fp16 pipeline.stages.decode.precision=fp16)
  python -m paraflow.plan "${sdxl[@]}" --figure $F/plan_sdxl_3840_1.md >/dev/null
  python -m paraflow.plan "${sdxl[@]}" +strategy=distrifusion launcher.devices=8 \
    --figure $F/plan_sdxl_3840_8_distrifusion.md >/dev/null
  python -m paraflow.plan "${sdxl[@]}" +strategy=distrifusion launcher.devices=8 \
    pipeline.stages.denoise.cache=deepcache --figure $F/plan_sdxl_3840_8_distrifusion_deepcache.md \
    >/dev/null
}

parity() {
  rm -rf $OUT/parity_strategies $OUT/parity_groupnorm  # a run folder is never overwritten
  python -m paraflow.tools.parity launcher.devices=2 height=128 width=128 steps=20 \
    --vary +strategy=naive_patch,sync_patch,ulysses,distrifusion,tensor \
    --out $OUT/parity_strategies --figure $F/parity_strategies_128.md >/dev/null
  python -m paraflow.tools.parity +strategy=displaced_patch launcher.devices=2 height=128 \
    width=128 steps=20 --vary strategy.warmup_steps=1,4 \
    --vary strategy.groupnorm=corrected_async,weighted,stale,sync,separate \
    --out $OUT/parity_groupnorm --figure $F/parity_groupnorm_128.md >/dev/null
}

bench() {
  rm -rf $OUT/bench_unet_256
  python -m paraflow.bench sizes=[256] steps=[10] \
    "strategies=[naive_patch,sync_patch,ulysses,distrifusion,tensor]" repeats=2 \
    hydra.run.dir=$OUT/bench_unet_256 +figure=$F/bench_unet_256.md >/dev/null
  python -m paraflow.bench preset=throughput "sizes=[512,1024]" memory_pass=false \
    cost.device_hour=1 +figure=$F/bench_throughput_cost.md >/dev/null
  python -m paraflow.bench preset=accelerate +figure=$F/bench_accelerate.md >/dev/null
  python -m paraflow.bench preset=accelerate_dit +figure=$F/bench_accelerate_dit.md >/dev/null
  python -m paraflow.bench preset=accelerate_flux +figure=$F/bench_accelerate_flux.md >/dev/null
  python -m paraflow.bench preset=parallel_pixart +figure=$F/bench_parallel_pixart.md >/dev/null
  python -m paraflow.bench preset=parallel_flux +figure=$F/bench_parallel_flux.md >/dev/null
}

samples() {  # the default model's sample grids (docs/default_model.md), captions beside them
  python -m paraflow.tools.samples --size 64 --out docs/samples_64.png >/dev/null
  python -m paraflow.tools.samples --size 256 --count 8 --columns 4 --out docs/samples_256.png >/dev/null
}

for group in "${@:-plans parity bench samples}"; do
  for g in $group; do "$g"; done
done
