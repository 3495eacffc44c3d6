"""hetcomp: distil an ensemble of heterogeneous recommenders into one small student (HetComp, WWW 2023)."""

__version__ = "0.1.0"
