"""evojax_nas: Large-Scale Evolution of Image Classifiers (Real et al. 2017) in JAX/Flax."""
