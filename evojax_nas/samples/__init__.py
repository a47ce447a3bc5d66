"""Sample DNAs shipped with the package."""
