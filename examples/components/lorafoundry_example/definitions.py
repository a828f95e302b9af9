"""Every instance under defs/ (one folder each, a defs.yaml in it) becomes part of this code location."""

from pathlib import Path

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
