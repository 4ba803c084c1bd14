"""Labelled image datasets: a folder of class folders or a table of labels, read into splits of
samples (folders.py, tables.py, samples.py); image files (images.py); decoded, transformed and
batched (loader.py, transforms.py). No networks here: batches are uint8 (N, 3, S, S) with integer
labels.

These names are imported on first use (`from headstart.data import Sample` reads samples.py alone): a
module that needs a dataset's files, not its pixels, loads no torch."""

from __future__ import annotations

from headstart.lazy import lazy_exports

_WHERE = {  # name -> its module here
    **dict.fromkeys(["DatasetSplits", "Sample", "refuse_val_split", "spread", "stratified_split"], "samples"),
    **dict.fromkeys(["IMAGE_ERRORS", "IMAGE_EXTENSIONS", "RUN_MARKER", "as_paths", "collect_files", "is_image_file",
                    "list_images", "load_image", "open_image"], "images"),
    **dict.fromkeys(["Columns", "IS_VALID_VALUES", "LABEL_COLUMNS", "PATH_COLUMNS", "SPLIT_VALUES",
                    "TABLE_SUFFIXES", "TableRow", "is_table", "read_table", "scan_table", "table_repeats",
                    "table_split"], "tables"),
    **dict.fromkeys(["evaluation_samples", "find_classes", "holds_runs", "make_samples", "parse_classes",
                    "scan_dataset"], "folders"),
    **dict.fromkeys(["Batch", "EpochBatches", "ImageDataset", "collate", "make_loader", "sample_seed"], "loader"),
}
__all__ = sorted(_WHERE)
__getattr__ = lazy_exports(__name__, _WHERE)
