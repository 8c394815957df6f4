"""Imported by the preprocessing workers' fork server after `worker_signals`
(`shards._WORKER_PRELOAD`): TensorFlow without the Keras its import loads
(`cli.keras_preload_skipped`), as the tools import it; the workers only read and write files with
it. A plain import took a second more of every preprocessing run's start (the workers wait for
the fork server). Its GPUs are not touched here: hiding them would start its runtime in the
process the workers fork from."""

from cav_mae_jax import cli

with cli.keras_preload_skipped():
  import tensorflow  # pylint: disable=unused-import
