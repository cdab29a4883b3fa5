"""`python -m ssmify ...`, which is what `accelerate launch -m ssmify` runs."""

import sys

from ssmify.cli import main

sys.exit(main())
