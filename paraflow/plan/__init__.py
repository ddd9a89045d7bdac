"""Memory and communication plan of a run, before anything is launched or loaded: per rank, the
weight bytes, the peak working memory (activations, exchange and stale buffers) and the bytes
sent per step and per run, for a strategy, model, resolution and rank count. A user learns that
a run will not fit before renting the machines.

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
  simulate.py) and the bytes of every collective (rank.py); tests/test_plan.py checks bytes and
  weights against real gloo runs.
- Fused attention is assumed (CPU and CUDA SDPA never hold the score matrix); kernel workspace
  and allocator slack are not modelled, so real peaks run somewhat higher
  (python -m paraflow.tools.plan_check measures how much).
"""

from paraflow.plan.planner import make_plan
from paraflow.plan.report import Plan, RankPlan

__all__ = ["Plan", "RankPlan", "make_plan"]
