"""Sample DNAs shipped with the package, and reading a DNA named on a command line."""

from importlib import resources

from evojax_nas import dna as dna_lib

SAMPLES = ("small_conv", "bench_conv4", "bench_conv8")


def read_dna(spec: str) -> dna_lib.DNA:
    """`initial` (the paper's start), a shipped sample's name, or a path to a DNA JSON file."""
    if spec == "initial":
        return dna_lib.initial_dna()
    if spec in SAMPLES:
        text = resources.files("evojax_nas.samples").joinpath(f"{spec}.json").read_text()
        return dna_lib.from_json(text)
    return dna_lib.load(spec)
