"""evojax_nas: Large-Scale Evolution of Image Classifiers (Real et al. 2017) in JAX/Flax.

`evojax_nas.load_model(DIR)` loads a model written by `evojax-nas export`.
"""

__all__ = ["load_model"]


def __getattr__(name: str):
    # Lazy: importing the package (e.g. its store, which knows nothing of JAX) stays cheap.
    if name == "load_model":
        from evojax_nas.export import load_model

        return load_model
    raise AttributeError(f"module 'evojax_nas' has no attribute {name!r}")
