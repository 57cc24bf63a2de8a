"""covidnet-jax: PEPX building blocks, COVID-Net models, cost model, data, training.

The public API is re-exported here as modules land; import submodules directly for the rest.
"""

from covidnet_jax.errors import CheckpointError, ConfigError, DataError, SpecError, UserError

__all__ = ["CheckpointError", "ConfigError", "DataError", "SpecError", "UserError"]
__version__ = "0.1.0"
