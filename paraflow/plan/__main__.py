"""`python -m paraflow.plan [overrides]`: the plan of a run, the same as
`python -m paraflow plan_only=true [overrides]` but without Hydra's run folder."""

from __future__ import annotations

import json
import sys

from paraflow.api import compose
from paraflow.errors import ParaflowError
from paraflow.plan import make_plan


def main(argv: list[str] | None = None) -> int:
    try:
        plan = make_plan(compose(sys.argv[1:] if argv is None else argv))
    except ParaflowError as err:
        print(f"paraflow: error: {err}", file=sys.stderr)
        return 2
    print(plan.markdown())
    print(json.dumps(plan.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
