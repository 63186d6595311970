"""`python -m notellm_jax.job --config configs/<name>.py [--only ...] [--force ...]`: the main job."""
import sys

from notellm_jax.main import main

main(["job", *sys.argv[1:]])
