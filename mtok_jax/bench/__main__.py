from mtok_jax import cli
from mtok_jax.bench import main

cli.run(main)
