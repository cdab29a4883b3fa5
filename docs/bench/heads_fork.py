"""Start a scripts/bench/retrieval.py run from another run's finished stages, so that it trains only what differs.

    python docs/bench/heads_fork.py runs/bench/A runs/bench/B heads9/hand-2cc6ee/synthetic10/seed0 1-matrix 2-hidden 3-logits

copies the run's `convert` folder and the named stage folders (each must be finished: its summary.json
present; their checkpoints/ are left behind) from A/<run> to B/<run>, and A's results.json with its
`runs` emptied, so that the bench reuses the teacher's scores. Then run the bench on B with a recipe whose
first stages are the same as A's: `run_recipe(resume=True)` skips the finished ones.
"""

import json
import shutil
import sys
from pathlib import Path

source, target, run, *stages = sys.argv[1:]
if not stages:
    sys.exit(__doc__)
for name in ("convert", *stages):
    folder = Path(source) / run / name
    if name != "convert" and not (folder / "summary.json").is_file():
        sys.exit(f"{folder}: not a finished stage (no summary.json)")
    shutil.copytree(folder, Path(target) / run / name, ignore=shutil.ignore_patterns("checkpoints"))
results = json.loads((Path(source) / "results.json").read_text())
results["runs"] = {}
(Path(target) / "results.json").write_text(json.dumps(results, indent=1))
print(f"{target}/{run}: {', '.join(('convert', *stages))} from {source}")
