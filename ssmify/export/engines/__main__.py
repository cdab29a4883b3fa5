"""`python -m ssmify.export.engines [vllm|llamacpp|all]`: build the engines' venvs (`make engines` runs it)."""

import sys

from ssmify.export.engines.envs import main

sys.exit(main(sys.argv[1:]))
