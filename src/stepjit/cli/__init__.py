"""The `stepjit` command: see the kernels a configuration compiles to, benchmark them, manage the
kernel cache.

    stepjit dump --momentum 0.9 --weight-decay 1e-4 --stage llvm-opt
    stepjit dump --optimizer mypackage.module:Lion --stage cuda
    stepjit bench --quick --json bench.json
    stepjit bench --optimizer rmsprop
    stepjit cache info

One module per subcommand (`dump`, `bench`, `cache`), each with `add_parser` and `command`;
`main` builds the parser from them. The optimizers and their hyperparameter flags come from the
registry (`stepjit.optim.registry`). Nothing in the library imports this package.

Exit status: 0 on success, 1 when the work itself fails, 2 for a bad flag or value (a one-line
message on stderr).
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
