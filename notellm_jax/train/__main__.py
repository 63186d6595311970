"""`python -m notellm_jax.train --config configs/<name>.py [--set section.field=value ...]`."""
import sys

from notellm_jax.main import main

main(["train", *sys.argv[1:]])
