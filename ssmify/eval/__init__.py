"""Score a student against its teacher: quality kept, speed gained.

Each evaluator is a plain function `(model, teacher, data, options) -> dict`, and works on any
Hugging Face causal LM (teacher, ssmify student, exported student):

- `perplexity.perplexity`, `agreement.agreement` (one shared pass, `scan.scan_windows`);
- `alignment.alignment` (per converted layer, through `ssmify.convert.probes`);
- `recall.recall` (synthetic associative recall against context length);
- `speed.speed` (prefill, decode, peak memory and decoding state against context length);
- `lm_eval_adapter.lm_eval_tasks` (lm-evaluation-harness tasks).

`data.load_data` builds the `EvalData` they read, `options.EvalOptions` sizes them,
`tasks.run_tasks` runs a list of them, and `report.write_report` writes report.json, report.md
and the plots. `ssmify eval` (ssmify.commands.eval) does all of it from the command line. Submodules are not
imported here, so that `ssmify --help` stays fast.
"""
