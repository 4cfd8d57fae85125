"""`python -m jaxal.diagnostics`: `python -m jaxal.run`'s flags (the experiment) and the `--diag.*` flags of
`BoundOptions`, read through `jaxal.cli` as every jaxal command reads its flags; bad values exit with
status 2 before any training."""

from __future__ import annotations

import sys

from jaxal import cli, run
from jaxal.diagnostics.bounds import BoundOptions
from jaxal.diagnostics.observer import run_diagnostics

PREFIX = "diag"
# Flags of earlier versions, with what to use instead: a command line written for them stops with this
# message rather than running something else.
RETIRED = {
    "lissa_scale": "now --diag.scale (the solve's options are jaxal.influence's, the same names as --influence.*)",
    "lissa_depth": "now --diag.depth (the solve's options are jaxal.influence's, the same names as --influence.*)",
    "lissa_repeats": "now --diag.repeats (the solve's options are jaxal.influence's, the same names as "
                     "--influence.*)",
    "lissa_batch_size": "now --diag.batch_size (the solve's options are jaxal.influence's, the same names as "
                        "--influence.*)",
}
DAMPING_CHANGED = (
    "--diag.damping is now relative, as --influence.damping: H is shifted by damping x --diag.scale (plus the "
    "weight decay with --diag.hessian_weight_decay true, the default); it was the absolute shift. Give "
    "--diag.scale with it; the old --diag.damping MU is --diag.hessian_weight_decay false --diag.damping MU/S "
    "--diag.scale S (any S > MU; for lissa S must also exceed the largest Hessian eigenvalue)")


def build_parser():
    parser = run.build_parser()
    parser.prog = "python -m jaxal.diagnostics"
    parser.description = ("Run an active-learning experiment and, after every cycle, the bound-tightness "
                          "diagnostics of Wang et al. (AAAI 2022): Fig. 3 (Target, Approx-1/2/3), Table 1 "
                          "(overlap with the true-label gradient norm), Table 2 (overlap of Eq. 3 and Eq. 5) "
                          "and Table 3 (train-test gap). Outputs go next to the run's results in --workdir "
                          "(default runs/diagnostics-<dataset>-<strategies>).")
    cli.add_options_flags(parser, PREFIX, BoundOptions, "diagnostics", retired=RETIRED)
    return parser


def options_from_args(args) -> BoundOptions:
    given = vars(args)
    if f"{PREFIX}.damping" in given and f"{PREFIX}.scale" not in given:
        raise ValueError(DAMPING_CHANGED)
    return cli.options_from_args(args, PREFIX, BoundOptions, retired=RETIRED)


def main(argv=None) -> int:
    """`jaxal.run.main` with the diagnostics: the same distributed start-up, errors and exit codes."""
    args = build_parser().parse_args(argv)
    return cli.run_command(args, lambda config: run_diagnostics(config, options_from_args(args),
                                                                workdir=config.workdir, overwrite=args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
