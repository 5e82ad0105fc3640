"""Everything that touches a model: dataset, configuration, the training child, checkpoints, generation.

Never imports the daemon; the daemon runs `training.child` and `training.worker` in processes of their
own (`listener.forks`).
"""
