"""The names of the paper's eleven mutations, importable without JAX (command-line help, config).

`mutations.MUTATIONS` is the source of truth; a test checks that these names equal its keys.
"""

MUTATION_NAMES: tuple[str, ...] = (
    "alter_learning_rate",
    "identity",
    "reset_weights",
    "insert_convolution",
    "remove_convolution",
    "alter_stride",
    "alter_number_of_channels",
    "filter_size",
    "insert_one_to_one",
    "add_skip",
    "remove_skip",
)
