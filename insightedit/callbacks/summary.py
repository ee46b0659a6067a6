"""The model summary printed when a fit starts, without a FLOPs count that was never measured.

Lightning counts FLOPs only by running the model on ``example_input_array``; the systems here have
none (an edit needs an image, an instruction and a whole sampler), so its summary shows a FLOPs column
of zeros and ``Total FLOPs: 0``. :class:`ModelSummaryTable` prints the same table and totals, with the
FLOPs column and total only when they were measured. The ``insightedit`` command uses it in place of
Lightning's default summary.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import get_formatted_model_size, get_human_readable_count


class ModelSummaryTable(RichModelSummary):
    """Lightning's Rich model summary; the FLOPs column and total appear only when measured (non-zero)."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        """Print the per-module table and the totals to Rich's console."""
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs" or total_flops]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            numeric = name in ("Params", "Params per Device", "FLOPs", "In sizes", "Out sizes")
            table.add_column(name, justify="right" if numeric else "left", style="dim" if name == " " else None)
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        totals = [
            ("Trainable params", get_human_readable_count(int(trainable_parameters))),
            ("Non-trainable params", get_human_readable_count(int(total_parameters - trainable_parameters))),
            ("Total params", get_human_readable_count(int(total_parameters))),
            ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
            ("Modules in train mode", str(total_training_modes["train"])),
            ("Modules in eval mode", str(total_training_modes["eval"])),
        ]
        if total_flops:
            totals.append(("Total FLOPs", get_human_readable_count(total_flops)))
        grid = Table.grid()
        grid.add_column()
        for name, value in totals:
            grid.add_row(f"[bold]{name}[/]: {value}")
        console.print(grid)
