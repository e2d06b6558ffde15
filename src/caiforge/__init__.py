"""caiforge: a declarative build system for Constitutional-AI datasets and models."""
