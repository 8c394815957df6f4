"""Imported first by the preprocessing workers' fork server (`shards._WORKER_PRELOAD`): SIGINT is
ignored there, and in every worker forked from it, from their first instruction on.

Ctrl-C reaches the whole process group and the parent alone handles it (it ends the workers and
removes their temporary files). The fork server ignores SIGINT only after its preloads, and gives
each forked worker the handler it had before that (`multiprocessing.forkserver.main`): Python's
own, which raised KeyboardInterrupt in a worker not yet at its own `SIG_IGN`. Landing in JAX's
gc callback (TensorFlow's import brings it), it printed "Exception ignored in:
<function _xla_gc_callback ...> ... KeyboardInterrupt" into the tool's stderr before its one
error line (1 of ~20 runs of tests/test_interrupts.py's preprocess case); during the fork
server's TensorFlow import, it ended the fork server with a traceback.
"""

import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)
