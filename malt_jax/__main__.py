import sys

from malt_jax.cli import main

sys.exit(main())
