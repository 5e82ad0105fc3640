"""Everything that touches a model: dataset, configuration, the training child, checkpoints, generation.

Never imports the daemon; the daemon runs `python -m training.child` as a child process.
"""
