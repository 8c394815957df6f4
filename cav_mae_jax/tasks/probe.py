"""Linear probe: fine-tuning with the encoder frozen; only the head (`mlp_head_*`) trains.

The encoder's parameters get no gradient and no optimizer state (tasks/finetune.py); its
configs are `configs/finetune.py:<recipe>,probe`.
"""

from cav_mae_jax.tasks.finetune import USES_LABELS
from cav_mae_jax.tasks.finetune import make_probe_task as make_task
from cav_mae_jax.tasks.finetune import validate_config

__all__ = ["USES_LABELS", "make_task", "validate_config"]
