"""The subcommands' parsers, one module each, defining `register(subparsers)`.

They live apart from the code they drive because importing any module of `ssmify.convert` or
`ssmify.export` runs that package's `__init__`, which loads torch and transformers. Here nothing
heavy is imported until a subcommand's `run` starts, so `ssmify --help` stays fast.
"""
