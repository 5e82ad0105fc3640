"""Everything that touches a model: dataset, configuration, the training child, checkpoints, generation.

Never imports the daemon; the daemon runs `training.child` and `training.worker` in processes of their
own (`listener.forks`).
"""

import logging

# peft imports bitsandbytes whenever it is installed, and bitsandbytes warns at import that its optional
# CPU 4-bit kernel "could not verify publisher trust status ... set trust_remote_code=True": in every
# process, 4-bit or not, where it reads as a security prompt. It only means a slower 4-bit path on CPU.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
