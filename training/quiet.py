"""Two library messages every process prints where they mean nothing: silenced when `training` is imported.

Only these two: every other warning of these libraries still shows.
"""

import logging

# peft imports bitsandbytes whenever it is installed, and bitsandbytes warns at import that its optional
# CPU 4-bit kernel "could not verify publisher trust status ... set trust_remote_code=True": in every
# process, 4-bit or not, where it reads as a security prompt. It only means a slower 4-bit path on CPU.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class _NoCpuAcceleratorGuess(logging.Filter):
    """DeepSpeed (imported by transformers' and trl's trainers whenever it is installed, the deepspeed extra)
    prints "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."
    on stdout in every process of a machine without a GPU, training on GPUs or not: the demo and the daemon's
    log showed it to every newcomer. Only that one line is dropped; DeepSpeed's other messages stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU.")


# A filter, not a level: DeepSpeed sets its logger's level (and adds its own handler) when it is imported.
logging.getLogger("DeepSpeed").addFilter(_NoCpuAcceleratorGuess())
