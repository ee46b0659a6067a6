"""AdvancedEdit data: record loading, synthetic scenes, robust images, the data module, streaming shards."""

from insightedit.data.datamodule import AdvancedEditDataModule
from insightedit.data.records import EditRecord, RecordSet, load_records

__all__ = ["AdvancedEditDataModule", "EditRecord", "RecordSet", "load_records"]
