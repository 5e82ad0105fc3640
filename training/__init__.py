"""Everything that touches a model: dataset, configuration, the training child, checkpoints, generation.

Never imports the daemon; the daemon runs `training.child` and `training.worker` in processes of their
own (`listener.forks`).
"""

from training import quiet  # noqa: F401  (library noise, silenced in every process that trains or serves)
