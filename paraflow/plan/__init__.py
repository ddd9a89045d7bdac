"""Memory, communication and compute plan of a run, before anything is launched or loaded: per
rank, the weight bytes, the peak working memory (activations, exchange and stale buffers), the
bytes sent and the FLOPs per step and per run and the full denoiser calls, for a strategy, model,
resolution, rank count and step cache. A user learns that a run will not fit before renting the
machines.

    python -m paraflow plan_only=true +strategy=distrifusion launcher.devices=8 \\
        model=sdxl_arch height=3840 width=3840 plan_memory_gb=80

    from paraflow.plan import make_plan
    plan = make_plan(compose([...]))      # plan.markdown(), plan.to_dict()

How, and why it can be trusted without the hardware:
- Everything is built on the meta device from config (paraflow/models/skeleton.py): shapes and
  parameter counts without memory, so SDXL at 3840² on 8 ranks plans on a laptop in seconds.
- The planner knows strategies only through paraflow.plugin.Strategy. Every rank is set up by the
  strategy's own `setup` on a planned context (planned.py: a communicator that moves nothing but
  books bytes as the real one does, and a DeviceMesh without process groups), which says the
  rank's images, its place and which ranks are alike (seats.py).
- One rank of each kind then runs the strategy's own `parallelize` on meta modules (weights: the
  parameters it leaves, a DTensor shard counting its local part) and a replay of its steps
  (`distinct_steps`) and decode, counting every live tensor after each op (live.py,
  simulate.py), the FLOPs of its products (flops.py) and the bytes of every collective
  (rank.py); tests/test_plan.py checks bytes, weights and denoiser calls against real gloo runs.
- A step cache (pipeline.stages.denoise.cache) is replayed installed, its decisions on the
  planned steps (cache.py: deepcache's schedule, or first_block's plan_cache_hit_rate).
- Fused attention is assumed (CPU and CUDA SDPA never hold the score matrix); kernel workspace
  and allocator slack are not modelled, so real peaks run somewhat higher
  (python -m paraflow.tools.plan_check measures how much).
"""

from paraflow.plan.planner import make_plan
from paraflow.plan.report import Plan, RankPlan

__all__ = ["Plan", "RankPlan", "make_plan"]
