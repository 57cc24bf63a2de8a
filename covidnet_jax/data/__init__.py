"""Data: COVIDx split files, the synthetic data set, preprocessing, the input pipeline.

Public API (see docs/CONTRACTS.md):

- `DataConfig`, `SynthConfig`: the `data:` section of experiment files.
- `load_data(config, *, seed) -> Data`; `Data.class_names`, `Data.train_batches`,
  `Data.eval_batches`, `Data.class_weights`, `Data.report`.
- `preprocess_image(path_or_array, *, resolution, channels) -> uint8 HxWxC`.
- `parse_split_file`, `open_covidx_folder`: COVIDx split files and folder checks.
- `write_synthetic_dataset`: the procedural synthetic COVIDx-format data set.
- `augment_batch`: the paper's augmentations on a uint8 batch.
"""

from covidnet_jax.data.augment import augment_batch
from covidnet_jax.data.covidx import (
    CovidxFolder,
    SplitEntry,
    open_covidx_folder,
    parse_split_file,
    parse_split_line,
)
from covidnet_jax.data.pipeline import (
    Data,
    DataConfig,
    DataReport,
    SynthConfig,
    load_data,
    split_validation,
)
from covidnet_jax.data.preprocess import preprocess_image
from covidnet_jax.data.synth import write_synthetic_dataset

__all__ = [
    "CovidxFolder",
    "Data",
    "DataConfig",
    "DataReport",
    "SplitEntry",
    "SynthConfig",
    "augment_batch",
    "load_data",
    "open_covidx_folder",
    "parse_split_file",
    "parse_split_line",
    "preprocess_image",
    "split_validation",
    "write_synthetic_dataset",
]
