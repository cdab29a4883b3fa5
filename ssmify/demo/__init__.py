"""`ssmify demo`: SmolLM2-135M-Instruct -> a distilled hybrid SSM, evaluated and reported, in one command.

The demo is the whole flow on an embedded default: the teacher and the Wikipedia text come from
`ssmify.assets` (cached under ~/.cache/ssmify), then convert, the three distillation stages of
`recipes/smollm2-demo.yaml` sized to the time budget, evaluation on a fixed held-out slice, and
DIR/report.md with a table and plots. `pipeline.run_demo` does the work; `ssmify.commands.demo` parses
the command line.
"""
