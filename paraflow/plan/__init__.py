"""Memory and communication plan of a run, before anything is launched or loaded: per rank, the
weight bytes, the peak working memory (activations, exchange and stale buffers) and the bytes
sent per step and per run, for a strategy, model, resolution and rank count. A user learns that
a run will not fit before renting the machines.

    python -m paraflow plan_only=true +strategy=distrifusion launcher.devices=8 \\
        model=sdxl_arch height=3840 width=3840 plan_memory_gb=80

    from paraflow.plan import make_plan
    plan = make_plan(compose([...]))      # plan.markdown(), plan.to_dict()

The model, and why it can be trusted without the hardware:
- Everything is built on the meta device from config (paraflow/models/skeleton.py): shapes and
  parameter counts without memory, so SDXL at 3840² on 8 ranks plans on a laptop in seconds.
- Layout: each rank's images, batch, band and groups come from the strategy's own arithmetic
  (layout.py).
- Bytes sent: closed formulas over the layer shapes of a meta call of the plain module, as the
  communicator counts them (comm.py); tests/test_plan.py checks them against real gloo runs.
- Weights: parameters at each stage's precision; tensor parallelism divides the planned layers
  (weights.py); checked against run.json's param_bytes.
- Working memory: the strategy's code is replayed on meta tensors over a communicator that moves
  nothing, and every tensor alive after each op is counted until Python frees it (live.py,
  simulate.py). Fused attention is assumed (CPU and CUDA SDPA never hold the score matrix);
  kernel workspace and allocator slack are not modelled, so real peaks run somewhat higher
  (python -m paraflow.tools.plan_check measures how much).
"""

from paraflow.plan.planner import make_plan
from paraflow.plan.report import Plan, RankPlan

__all__ = ["Plan", "RankPlan", "make_plan"]
