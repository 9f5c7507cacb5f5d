"""The subcommands of `evit-hf`, one module each (`visualize`, `benchmark`, `convert`, `calibrate`), with the
argparse types (`arguments`), the reading of model and image arguments (`inputs`) and the output-folder checks
(`output_checks`) they share. `evit_hf.cli` gathers them under one parser.

Each command module holds `SUMMARY` (its line in `evit-hf --help`), `DESCRIPTION`, `add_arguments(parser)` and
`run(parser, args, argv)`. None imports torch, transformers or PIL at module level: a bad argument is answered before
they load."""
