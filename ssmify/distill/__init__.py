"""Staged distillation (matrix -> hidden -> logits) of a converted student from its teacher, on accelerate.

Python API (imported from the modules, so that `import ssmify.distill` stays light for the CLI):

    from ssmify.distill.recipe import load_recipe     # YAML + --set overrides -> validated Recipe
    from ssmify.distill.budget import fit_to_time     # scale stage token budgets to a time budget
    from ssmify.distill.run import run_recipe         # train the stages; returns their summaries
"""
