from mtok_jax import environment  # first: the parent and the JAX children never use transformers' torch classes

environment.without_torch_in_transformers()

from mtok_jax import cli  # noqa: E402
from mtok_jax.bench import main  # noqa: E402

cli.run(main)
