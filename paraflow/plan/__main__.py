"""`python -m paraflow.plan [overrides] [--figure PATH]`: the plan of a run, the same as
`python -m paraflow plan_only=true [overrides]` but without Hydra's run folder. `--figure
docs/figures/NAME.md` also writes the plan's table there, under this command line and the
commit."""

from __future__ import annotations

import json
import shlex
import sys

from paraflow.api import compose
from paraflow.errors import ParaflowError
from paraflow.plan import make_plan


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(args):
        print(__doc__)
        return 0
    command = shlex.join(["python", "-m", "paraflow.plan", *args])
    figure = None
    if "--figure" in args:
        at = args.index("--figure")
        if at + 1 >= len(args):
            print("paraflow: error: --figure needs a path", file=sys.stderr)
            return 2
        figure, args = args[at + 1], args[:at] + args[at + 2:]
    try:
        plan = make_plan(compose(args))
    except ParaflowError as err:
        print(f"paraflow: error: {err}", file=sys.stderr)
        return 2
    if figure is not None:
        from paraflow.bench.report import write_figure

        write_figure(figure, command, plan.markdown(), measured=False)
    print(plan.markdown())
    print(json.dumps(plan.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
