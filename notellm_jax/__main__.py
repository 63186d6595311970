"""`python -m notellm_jax <command> ...` = the `notellm` console script."""
from notellm_jax.main import main

main()
