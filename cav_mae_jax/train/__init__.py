"""CAV-MAE pretraining: mesh and shardings (`mesh`), optimizer and schedules (`optim`), train
state and jit steps (`step`), checkpoints and preemption (`checkpoint`), metric writers and
progress (`metrics`), FLOP counts (`flops`), device-time profiles (`profile`), config checks
(`validation`), in-memory input (`array_input`), a failed process's peers stopped at once
(`peers`) and the sectioned loop (`trainer.train_and_evaluate`)."""
