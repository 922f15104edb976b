"""Readers for each dataset as its authors distribute it. Each `plans(...)` returns the
list of SplitPlan (output name, split, record stream) for one input."""
from data_prep.sources import ani1x, ase_files, qm9, sgdml, spice, structures, transition1x
from data_prep.sources.common import InputFormatError, SplitPlan

READERS = {
    "oc20": ase_files.plans,
    "oc22": ase_files.plans,
    "ani1x": ani1x.plans,
    "transition1x": transition1x.plans,
    "qm9": qm9.plans,
    "rmd17": sgdml.rmd17_plans,
    "md22": sgdml.md22_plans,
    "spice": spice.plans,
    "matbench": structures.matbench_plans,
    "qmof": structures.qmof_plans,
}

__all__ = ["READERS", "InputFormatError", "SplitPlan"]
