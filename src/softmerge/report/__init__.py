"""Reports on a merge: gates.json, figures, text and markdown tables."""

from .gates import GateSnapshot, gates_to_dict, read_gates_json, write_gates_json
from .plots import plot_convergence, plot_gate_heatmap, plot_path
from .tables import format_markdown_table, format_table

__all__ = [
    "GateSnapshot",
    "format_markdown_table",
    "format_table",
    "gates_to_dict",
    "plot_convergence",
    "plot_gate_heatmap",
    "plot_path",
    "read_gates_json",
    "write_gates_json",
]
