"""Everything that touches a model: dataset, configuration, the training child, checkpoints, generation.

Never imports the daemon; the daemon runs `python -m training.run` as a child process.
"""
