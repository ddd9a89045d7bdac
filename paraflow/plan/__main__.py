"""`python -m paraflow.plan [overrides]`: the plan of a run, the same as
`python -m paraflow plan_only=true [overrides]` but without Hydra's run folder."""

from __future__ import annotations

import json
import sys

from paraflow.api import compose
from paraflow.errors import ParaflowError
from paraflow.plan import make_plan


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(args):
        print(__doc__)
        return 0
    try:
        plan = make_plan(compose(args))
    except ParaflowError as err:
        print(f"paraflow: error: {err}", file=sys.stderr)
        return 2
    print(plan.markdown())
    print(json.dumps(plan.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
