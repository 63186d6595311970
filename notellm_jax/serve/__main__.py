"""`python -m notellm_jax.serve` = `notellm serve` (see `notellm_jax.serve.cli`)."""
if __name__ == "__main__":
    import sys

    from notellm_jax.main import main

    main(["serve", *sys.argv[1:]])
